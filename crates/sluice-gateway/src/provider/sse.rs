//! A parser of server-sent events (`text/event-stream`) fed with chunks as they arrive.

/// One event: its `event:` name (if any) and its `data:` lines joined by newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// Bytes of a line not yet complete (a chunk may end inside a line, even inside a character).
    partial: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    /// Feeds a chunk and returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.partial.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(SseEvent { event: self.event.take(), data: self.data.join("\n") });
                    self.data.clear();
                }
                self.event = None;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event = Some(value.to_string()),
                "data" => self.data.push(value.to_string()),
                _ => {} // comments (`: ping`), `id`, `retry`
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent { event: event.map(str::to_string), data: data.to_string() }
    }

    #[test]
    fn events_split_across_chunks_and_lines_join() {
        let mut p = SseParser::default();
        assert_eq!(p.push(b"event: a\r\ndata: {\"x\""), vec![]);
        assert_eq!(p.push(b":1}\r\n\r\n: comment\n\ndata: l1\ndata:l2\n"), vec![ev(Some("a"), "{\"x\":1}")]);
        assert_eq!(p.push(b"\ndata: [DONE]\n\n"), vec![ev(None, "l1\nl2"), ev(None, "[DONE]")]);
    }

    #[test]
    fn a_character_split_between_chunks_survives() {
        let mut p = SseParser::default();
        let bytes = "data: é\n\n".as_bytes();
        assert_eq!(p.push(&bytes[..7]), vec![]);
        assert_eq!(p.push(&bytes[7..]), vec![ev(None, "é")]);
    }
}
