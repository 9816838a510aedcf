#!/usr/bin/env python3
"""A deterministic stand-in for a sentiment model, to try `sluice eval` without an API key.

Serves OpenAI's `POST /v1/chat/completions` on 127.0.0.1 (port 8199, or --port) and answers
from the last user message by keyword: the first rule whose keyword occurs in it (ignoring
case) gives the answer, else the fallback. `keywords-v1` is naive on purpose (negations,
sarcasm and unknown words fool it); `keywords-v2` knows a few more words, and answers a
question with a sentence that names no label (an invalid answer). Standard library only.

    python3 examples/eval/keyword_model.py &
    sluice eval --dataset examples/eval/sentiment.jsonl --gateway examples/eval/gateway.yaml \
        --route sentiment --compare sentiment-v2
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

V1 = [
    ("love", "positive"), ("great", "positive"), ("excellent", "positive"), ("happy", "positive"),
    ("terrible", "negative"), ("broken", "negative"), ("refund", "negative"), ("worst", "negative"),
    ("disappoint", "negative"),
]
V2 = [("not great", "negative"), ("best", "positive"), ("joy", "positive"), ("overheat", "negative"),
      ("?", "It depends on the model you have.")] + V1
MODELS = {"keywords-v1": V1, "keywords-v2": V2}
FALLBACK = "neutral"


def classify(model, text):
    text = text.lower()
    for keyword, answer in MODELS.get(model, V1):
        if keyword in text:
            return answer
    return FALLBACK


def last_user_text(messages):
    for m in reversed(messages or []):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content or ""
    return ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are written apart: without this, Nagle's algorithm holds the body back
    # until the client's delayed ACK, some 40 ms per answer.
    disable_nagle_algorithm = True

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        try:
            req = json.loads(body)
        except ValueError:
            return self.reply(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
        model = req.get("model", "keywords-v1")
        prompt = " ".join(str(m.get("content", "")) for m in req.get("messages", []))
        answer = classify(model, last_user_text(req.get("messages")))
        self.reply(200, {
            "id": "chatcmpl-keywords", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(answer.split()),
                      "total_tokens": len(prompt.split()) + len(answer.split())},
        })

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8199)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"keyword model listening on http://127.0.0.1:{args.port}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
