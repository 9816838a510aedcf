//! The labelled dataset of an evaluation: JSON Lines, one example per line.
//!
//! ```text
//! {"system": "Answer with one word: positive, negative or neutral.", "labels": ["positive", "negative", "neutral"]}
//! {"id": "r1", "input": "I love it", "label": "positive"}
//! {"messages": [{"role": "user", "content": "Meh."}], "label": "neutral", "meta": {"source": "app"}}
//! ```
//!
//! An example has `input` (the user message's text) or `messages` (a conversation: roles
//! `system`, `developer`, `user` and `assistant`, `content` a string or text parts), a `label`,
//! and optionally an `id` (a string or an integer; the line number by default) and `meta`
//! (anything, ignored). The first line may instead be a header with a `system` prompt and the
//! `labels` (the label set, in order; without it the label set is every label of the dataset,
//! sorted). Labels are compared ignoring case. Blank lines are skipped. Unknown fields are
//! errors, and every error names its line and field.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::model::Message;

/// At most this many line errors are reported; the rest are counted.
const MAX_REPORTED: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The header's system prompt.
    pub system: Option<String>,
    /// The label set, each in its first spelling.
    pub labels: Vec<String>,
    pub examples: Vec<Example>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 1-based line number in the file.
    pub line: usize,
    pub id: String,
    pub input: Input,
    /// The index of the true label in [`Dataset::labels`].
    pub label: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// One user message.
    Text(String),
    Messages(Vec<Message>),
}

/// What is wrong with one line.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    /// The field, as a path (`messages[1].role`), when one field is at fault.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "line {}: `{field}`: {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The lines that are wrong (at most 20) and how many there are in all.
    #[error("{}", describe(.errors, *.total))]
    Lines { errors: Vec<LineError>, total: usize },
    #[error("the dataset has no examples; write one JSON object per line: {{\"input\": \"...\", \"label\": \"...\"}}")]
    Empty,
}

fn describe(errors: &[LineError], total: usize) -> String {
    let mut text = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    if total > errors.len() {
        text.push_str(&format!("\n... and {} more", total - errors.len()));
    }
    text
}

/// Parses a dataset from its text.
pub fn parse(text: &str) -> Result<Dataset, Error> {
    let mut parser = Parser::default();
    let mut first = true;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                parser.error(line, None, format!("not valid JSON: {e}"));
                first = false;
                continue;
            }
        };
        let Value::Object(object) = value else {
            parser.error(line, None, "must be a JSON object".into());
            first = false;
            continue;
        };
        let is_header = first && !["input", "messages", "label"].iter().any(|k| object.contains_key(*k));
        first = false;
        if is_header {
            parser.header(line, &object);
        } else {
            parser.example(line, &object);
        }
    }
    parser.finish()
}

#[derive(Default)]
struct Parser {
    system: Option<String>,
    /// Set by a header: only these labels are allowed.
    declared: bool,
    labels: Vec<String>,
    /// Lowercased label → index into `labels`.
    label_index: HashMap<String, usize>,
    /// `(example, lowercased label)`: labels are resolved to indexes at the end, once sorted.
    examples: Vec<(Example, String)>,
    ids: HashMap<String, usize>,
    errors: Vec<LineError>,
    total_errors: usize,
}

impl Parser {
    fn error(&mut self, line: usize, field: Option<&str>, message: String) {
        self.total_errors += 1;
        if self.errors.len() < MAX_REPORTED {
            self.errors.push(LineError { line, field: field.map(str::to_string), message });
        }
    }

    fn header(&mut self, line: usize, object: &Map<String, Value>) {
        for (key, value) in object {
            match key.as_str() {
                "system" => match value.as_str() {
                    Some(s) => self.system = Some(s.to_string()),
                    None => self.error(line, Some("system"), "must be a string".into()),
                },
                "labels" => {
                    let Some(items) = value.as_array().filter(|a| !a.is_empty()) else {
                        self.error(line, Some("labels"), "must be a non-empty array of strings".into());
                        continue;
                    };
                    self.declared = true;
                    for (i, item) in items.iter().enumerate() {
                        let field = format!("labels[{i}]");
                        match item.as_str().map(str::trim).filter(|s| !s.is_empty()) {
                            Some(label) if self.label_index.contains_key(&label.to_lowercase()) => {
                                self.error(line, Some(&field), format!("`{label}` is listed twice"))
                            }
                            Some(label) => self.add_label(label),
                            None => self.error(line, Some(&field), "must be a non-empty string".into()),
                        }
                    }
                }
                other => self.error(
                    line,
                    Some(other),
                    "unknown field; a header line has `system` and `labels`, an example has `input` or \
                     `messages`, and `label`"
                        .into(),
                ),
            }
        }
    }

    fn add_label(&mut self, label: &str) {
        self.label_index.insert(label.to_lowercase(), self.labels.len());
        self.labels.push(label.to_string());
    }

    fn example(&mut self, line: usize, object: &Map<String, Value>) {
        let before = self.total_errors;
        for key in object.keys() {
            if !["id", "input", "messages", "label", "meta"].contains(&key.as_str()) {
                self.error(
                    line,
                    Some(key),
                    "unknown field; an example has `input` or `messages`, `label`, and optionally `id` and `meta`"
                        .into(),
                );
            }
        }
        let id = match object.get("id") {
            None => line.to_string(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
            Some(_) => {
                self.error(line, Some("id"), "must be a non-empty string or an integer".into());
                String::new()
            }
        };
        let input = match (object.get("input"), object.get("messages")) {
            (Some(_), Some(_)) => {
                self.error(line, Some("messages"), "give `input` or `messages`, not both".into());
                None
            }
            (None, None) => {
                self.error(line, Some("input"), "missing; an example needs `input` (text) or `messages`".into());
                None
            }
            (Some(Value::String(s)), None) if !s.trim().is_empty() => Some(Input::Text(s.clone())),
            (Some(_), None) => {
                self.error(line, Some("input"), "must be a non-empty string".into());
                None
            }
            (None, Some(messages)) => self.messages(line, messages).map(Input::Messages),
        };
        let label = match object.get("label") {
            None => {
                self.error(line, Some("label"), "missing; every example needs its true label".into());
                None
            }
            Some(v) => match v.as_str().map(str::trim).filter(|s| !s.is_empty()) {
                None => {
                    self.error(line, Some("label"), "must be a non-empty string".into());
                    None
                }
                Some(label) => {
                    let key = label.to_lowercase();
                    if !self.label_index.contains_key(&key) {
                        if self.declared {
                            let known = self.labels.join(", ");
                            self.error(
                                line,
                                Some("label"),
                                format!("`{label}` is not in the header's labels ({known})"),
                            );
                        } else {
                            self.add_label(label);
                        }
                    }
                    Some(key)
                }
            },
        };
        if !id.is_empty() {
            if let Some(first) = self.ids.get(&id) {
                let message = format!("`{id}` is also the id of line {first}; ids must be unique");
                self.error(line, Some("id"), message);
            } else {
                self.ids.insert(id.clone(), line);
            }
        }
        if self.total_errors > before {
            return;
        }
        if let (Some(input), Some(label)) = (input, label) {
            self.examples.push((Example { line, id, input, label: 0 }, label));
        }
    }

    fn messages(&mut self, line: usize, value: &Value) -> Option<Vec<Message>> {
        let Some(items) = value.as_array().filter(|a| !a.is_empty()) else {
            self.error(line, Some("messages"), "must be a non-empty array of {\"role\", \"content\"}".into());
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = |field: &str| format!("messages[{i}].{field}");
            let Some(object) = item.as_object() else {
                self.error(line, Some(&format!("messages[{i}]")), "must be an object".into());
                continue;
            };
            if let Some(key) = object.keys().find(|k| !["role", "content", "name"].contains(&k.as_str())) {
                self.error(line, Some(&at(key)), "unknown field; a message has `role` and `content`".into());
                continue;
            }
            let content = match object.get("content") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(parts)) => {
                    let texts: Option<Vec<&str>> =
                        parts.iter().map(|p| if p["type"] == "text" { p["text"].as_str() } else { None }).collect();
                    match texts {
                        Some(t) => Some(t.concat()),
                        None => {
                            self.error(line, Some(&at("content")), "only text parts are supported".into());
                            continue;
                        }
                    }
                }
                _ => {
                    self.error(line, Some(&at("content")), "must be a string or an array of text parts".into());
                    continue;
                }
            };
            let content = content.unwrap_or_default();
            let message = match object.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => Message::system(content),
                Some("user") => Message::user(content),
                Some("assistant") => Message::assistant(content),
                Some(other) => {
                    let message = format!("unknown role `{other}`; use system, user or assistant");
                    self.error(line, Some(&at("role")), message);
                    continue;
                }
                None => {
                    self.error(line, Some(&at("role")), "missing; must be system, user or assistant".into());
                    continue;
                }
            };
            out.push(message);
        }
        (out.len() == items.len()).then_some(out)
    }

    fn finish(mut self) -> Result<Dataset, Error> {
        if self.total_errors > 0 {
            return Err(Error::Lines { errors: self.errors, total: self.total_errors });
        }
        if self.examples.is_empty() {
            return Err(Error::Empty);
        }
        if !self.declared {
            // Without a header the label set is sorted, so its order does not depend on the
            // order of the lines.
            self.labels.sort_by_key(|l| l.to_lowercase());
            self.label_index = self.labels.iter().enumerate().map(|(i, l)| (l.to_lowercase(), i)).collect();
        }
        let examples = self
            .examples
            .into_iter()
            .map(|(example, label)| Example { label: self.label_index.get(&label).copied().unwrap_or(0), ..example })
            .collect();
        Ok(Dataset { system: self.system, labels: self.labels, examples })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Err(Error::Lines { errors, .. }) => errors.iter().map(ToString::to_string).collect(),
            other => panic!("expected line errors, got {other:?}"),
        }
    }

    #[test]
    fn a_dataset_parses_with_its_header_ids_and_labels() {
        let text = r#"{"system": "One word.", "labels": ["Positive", "negative"]}
{"id": "a", "input": "I love it", "label": "positive"}

{"id": 7, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "bad"}]}], "label": "NEGATIVE", "meta": {"x": 1}}
{"input": "fine", "label": "Positive"}
"#;
        let d = parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.system.as_deref(), Some("One word."));
        assert_eq!(d.labels, ["Positive", "negative"]);
        let summary: Vec<(usize, &str, usize)> = d.examples.iter().map(|e| (e.line, e.id.as_str(), e.label)).collect();
        assert_eq!(summary, [(2, "a", 0), (4, "7", 1), (5, "5", 0)]);
        assert_eq!(d.examples[0].input, Input::Text("I love it".into()));
        assert_eq!(d.examples[1].input, Input::Messages(vec![Message::system("s"), Message::user("bad")]));
    }

    #[test]
    fn without_a_header_the_label_set_is_sorted() {
        let d = parse("{\"input\": \"x\", \"label\": \"b\"}\n{\"input\": \"y\", \"label\": \"A\"}\n{\"input\": \"z\", \"label\": \"a\"}")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.labels, ["A", "b"]);
        assert_eq!(d.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0, 0]);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_field() {
        let text = r#"{"input": "ok", "label": "a"}
{"input": "x"}
{"input": "x", "label": ""}
not json
{"input": "x", "messages": [], "label": "a"}
{"text": "x", "label": "a"}
{"messages": [{"role": "bot", "content": "x"}], "label": "a"}
{"messages": [{"role": "user", "content": [{"type": "image_url"}]}], "label": "a"}
{"id": "1", "input": "dup", "label": "a"}
[1, 2]
{"input": 3, "label": "a"}
"#;
        let got = errors(text);
        assert_eq!(got[0], "line 2: `label`: missing; every example needs its true label");
        assert_eq!(got[1], "line 3: `label`: must be a non-empty string");
        assert!(got[2].starts_with("line 4: not valid JSON: expected ident at line 1 column 2"), "{}", got[2]);
        assert_eq!(got[3], "line 5: `messages`: give `input` or `messages`, not both");
        assert!(got[4].starts_with("line 6: `text`: unknown field"), "{}", got[4]);
        assert_eq!(got[5], "line 6: `input`: missing; an example needs `input` (text) or `messages`");
        assert_eq!(got[6], "line 7: `messages[0].role`: unknown role `bot`; use system, user or assistant");
        assert_eq!(got[7], "line 8: `messages[0].content`: only text parts are supported");
        assert_eq!(got[8], "line 9: `id`: `1` is also the id of line 1; ids must be unique");
        assert_eq!(got[9], "line 10: must be a JSON object");
        assert_eq!(got[10], "line 11: `input`: must be a non-empty string");
        assert_eq!(got.len(), 11);
    }

    #[test]
    fn a_header_restricts_the_labels_and_rejects_unknown_fields() {
        let got = errors("{\"labels\": [\"a\", \"b\"]}\n{\"input\": \"x\", \"label\": \"c\"}");
        assert_eq!(got, ["line 2: `label`: `c` is not in the header's labels (a, b)"]);
        let got = errors("{\"system\": \"s\", \"prompt\": \"p\"}\n{\"input\": \"x\", \"label\": \"c\"}");
        assert!(got[0].starts_with("line 1: `prompt`: unknown field; a header line has"), "{got:?}");
        let got = errors("{\"labels\": [\"a\", \"A\"]}\n{\"input\": \"x\", \"label\": \"a\"}");
        assert_eq!(got, ["line 1: `labels[1]`: `A` is listed twice"]);
    }

    #[test]
    fn many_errors_are_capped_and_counted() {
        let text = "{\"input\": \"x\"}\n".repeat(25);
        let Err(e) = parse(&text) else { panic!("should fail") };
        let text = e.to_string();
        assert_eq!(text.lines().count(), 21, "{text}");
        assert!(text.ends_with("... and 5 more"), "{text}");
    }

    #[test]
    fn an_empty_dataset_is_an_error() {
        assert_eq!(parse("\n  \n"), Err(Error::Empty));
        assert_eq!(parse("{\"system\": \"s\"}\n"), Err(Error::Empty));
    }
}
