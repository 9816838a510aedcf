//! The JSON Schema of workflow files, generated from the definition types.

use crate::def::WorkflowDef;

/// The schema as pretty JSON; `schemas/workflow.schema.json` in the repository holds a copy that a
/// test keeps in step with the types.
pub fn workflow_schema() -> String {
    let mut schema = schemars::schema_for!(WorkflowDef);
    schema.insert("$id".into(), "https://sluice.dev/schemas/workflow.schema.json".into());
    serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
}
