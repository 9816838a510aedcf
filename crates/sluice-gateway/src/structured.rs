//! Structured output: the answer must be JSON valid against the caller's JSON Schema. An invalid
//! answer gets one repair call that shows the model its answer and the validation errors.

use std::future::Future;

use serde_json::Value;

use crate::gateway::CallError;
use crate::model::{ChatRequest, ChatResponse, Message};
use crate::route::Call;
use crate::usage::UsageRecord;

/// At most this many validation errors are listed, in the repair request and in [`Error`].
const MAX_ERRORS: usize = 20;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The caller's schema does not compile; no upstream was called.
    #[error("the output schema is not a valid JSON Schema: {0}")]
    BadSchema(String),
    /// The answer was invalid, and so was the answer to the repair request.
    #[error("the answer does not match the output schema, even after one repair: {}", .errors.join("; "))]
    Invalid {
        /// What is wrong with the last answer, each with the JSON pointer of where.
        errors: Vec<String>,
        /// The last answer's text.
        answer: String,
    },
}

/// What a structured call ends with: the answer and its JSON, or why not; and the usage records
/// of both calls when a repair was tried.
pub(crate) struct Outcome {
    pub result: Result<(ChatResponse, Value), CallError>,
    pub usage: Vec<UsageRecord>,
}

/// Whether `schema` compiles as a JSON Schema; the compiler's complaint if not.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    jsonschema::validator_for(schema).map(|_| ()).map_err(|e| e.to_string())
}

/// Sends `req` with `send`, checks the answer against `schema`, and sends one repair request if it
/// is invalid.
pub(crate) async fn call<F, Fut>(schema: &Value, req: &ChatRequest, mut send: F) -> Outcome
where
    F: FnMut(ChatRequest) -> Fut,
    Fut: Future<Output = Call>,
{
    let validator = match jsonschema::validator_for(schema) {
        Ok(v) => v,
        Err(e) => return Outcome { result: Err(Error::BadSchema(e.to_string()).into()), usage: Vec::new() },
    };
    let first = send(req.clone()).await;
    let mut usage = first.usage;
    let answer = match first.result {
        Ok(resp) => resp,
        Err(e) => return Outcome { result: Err(e.into()), usage },
    };
    let errors = match check(&validator, &answer.text) {
        Ok(json) => return Outcome { result: Ok((answer, json)), usage },
        Err(errors) => errors,
    };
    tracing::info!(errors = errors.len(), "answer does not match the output schema; asking for a repair");
    let second = send(repair_request(req, &answer.text, &errors, schema)).await;
    usage.extend(second.usage);
    let answer = match second.result {
        Ok(resp) => resp,
        Err(e) => return Outcome { result: Err(e.into()), usage },
    };
    match check(&validator, &answer.text) {
        Ok(json) => Outcome { result: Ok((answer, json)), usage },
        Err(errors) => Outcome { result: Err(Error::Invalid { errors, answer: answer.text }.into()), usage },
    }
}

/// The answer as JSON valid against the schema, or what is wrong with it.
fn check(validator: &jsonschema::Validator, text: &str) -> Result<Value, Vec<String>> {
    let json: Value =
        serde_json::from_str(strip_fence(text)).map_err(|e| vec![format!("the answer is not JSON: {e}")])?;
    let mut errors: Vec<String> = validator
        .iter_errors(&json)
        .map(|e| {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { "the root".to_string() } else { format!("`{at}`") };
            format!("at {at}: {e}")
        })
        .collect();
    if errors.is_empty() {
        return Ok(json);
    }
    if errors.len() > MAX_ERRORS {
        let more = errors.len() - MAX_ERRORS;
        errors.truncate(MAX_ERRORS);
        errors.push(format!("and {more} more"));
    }
    Err(errors)
}

/// Models often wrap JSON in a Markdown code fence even when told not to; one fence around the
/// whole answer is taken off, anything else must be JSON as it stands.
fn strip_fence(text: &str) -> &str {
    let trimmed = text.trim();
    let inner = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"));
    inner.map_or(trimmed, str::trim)
}

/// The original conversation, the invalid answer, and a user message listing the errors.
fn repair_request(req: &ChatRequest, answer: &str, errors: &[String], schema: &Value) -> ChatRequest {
    let mut repair = req.clone();
    repair.messages.push(Message::assistant(answer));
    let list: String = errors.iter().map(|e| format!("\n- {e}")).collect();
    repair.messages.push(Message::user(format!(
        "Your answer is not valid against the required JSON Schema. Validation errors:{list}\n\n\
         The schema: {schema}\n\n\
         Reply with the corrected JSON only: no explanation, no code fence."
    )));
    repair
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors_of(schema: Value, text: &str) -> Vec<String> {
        let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{e}"));
        check(&validator, text).err().unwrap_or_default()
    }

    #[test]
    fn checks_name_where_and_what() {
        let schema = json!({
            "type": "object",
            "required": ["label", "score"],
            "properties": {"label": {"enum": ["spam", "ham"]}, "score": {"type": "number"}},
        });
        let cases: &[(&str, &[&str])] = &[
            (r#"{"label": "spam", "score": 0.9}"#, &[]),
            ("```json\n{\"label\": \"ham\", \"score\": 1}\n```", &[]),
            (
                r#"{"label": "eggs", "score": "high"}"#,
                &["at `/label`:", "at `/score`: \"high\" is not of type \"number\""],
            ),
            (r#"{"label": "spam"}"#, &["at the root: \"score\" is a required property"]),
            ("sure! here it is", &["the answer is not JSON: expected value at line 1 column 1"]),
            ("```\nnot json\n```", &["the answer is not JSON"]),
        ];
        for (text, expect) in cases {
            let got = errors_of(schema.clone(), text);
            assert_eq!(got.len(), expect.len(), "{text}: {got:?}");
            for (g, e) in got.iter().zip(expect.iter()) {
                assert!(g.starts_with(e), "{text}\n  expected: {e}\n  got: {g}");
            }
        }
    }

    #[test]
    fn long_error_lists_are_cut() {
        let schema = json!({"type": "array", "items": {"type": "string"}});
        let got = errors_of(schema, &serde_json::to_string(&vec![1; 30]).unwrap_or_default());
        assert_eq!(got.len(), MAX_ERRORS + 1);
        assert_eq!(got.last().map(String::as_str), Some("and 10 more"));
    }
}
