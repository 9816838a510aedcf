"""The official `openai` package against Sluice's /v1/chat/completions.

Usage: openai_client.py BASE_URL ROUTE
Prints one JSON line per call: a plain completion, a streamed one, and a streamed one that the
upstream cuts (which must raise, not end quietly).
"""

import json
import os
import sys

import openai
from openai import OpenAI

base_url, route = sys.argv[1], sys.argv[2]
# The OpenAI SDK sends its API key as a bearer token: a Sluice API key is what it needs.
client = OpenAI(base_url=f"{base_url}/v1", api_key=os.environ["SLUICE_API_KEY"], max_retries=0)

resp = client.chat.completions.create(
    model=route,
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
    temperature=0.2,
    max_tokens=50,
)
print(json.dumps({
    "call": "plain",
    "content": resp.choices[0].message.content,
    "finish_reason": resp.choices[0].finish_reason,
    "model": resp.model,
    "prompt_tokens": resp.usage.prompt_tokens,
    "completion_tokens": resp.usage.completion_tokens,
}), flush=True)

pieces, usage = [], None
stream = client.chat.completions.create(
    model=route,
    messages=[{"role": "user", "content": "count"}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.total_tokens
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
print(json.dumps({"call": "stream", "pieces": pieces, "total_tokens": usage}), flush=True)

pieces, error = [], None
try:
    for chunk in client.chat.completions.create(
        model=route, messages=[{"role": "user", "content": "cut"}], stream=True
    ):
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
except openai.APIError as e:
    error = str(e)
print(json.dumps({"call": "cut", "pieces": pieces, "error": error}), flush=True)
