//! The MCP conformance suite's fixtures (`serve --conformance-fixtures`): the tools, resources,
//! prompts and completion handler that `@modelcontextprotocol/conformance` calls by name
//! (`test_simple_text`, `test://static-text`, `test_simple_prompt`, ...), as its reference
//! "everything server" has them.
//!
//! The suite checks protocol features through these fixtures: content types, log and progress
//! notifications during a call, server-to-client sampling and elicitation, resource templates,
//! prompts and completions. Serving them beside the ledger's own tools, through the same
//! session, transport, auth and handler, shows that this server's MCP stack does each of those
//! things; off by default, so a production server advertises only what the ledger offers.

use super::tools::LedgerTools;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, CompleteResult, GetPromptResult, ListPromptsResult, ListResourceTemplatesResult,
    ListResourcesResult, ReadResourceResult, RequestMetaObject,
};
use rmcp::{tool, tool_router, ErrorData as McpError, Peer, RoleServer};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::time::Duration;

/// A 1x1 PNG, as the suite's reference server sends it.
const TEST_IMAGE_BASE64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==";
/// A tiny WAV file.
const TEST_AUDIO_BASE64: &str = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=";
/// Between the notifications a fixture sends during a call, so a client sees them arrive apart.
const NOTIFICATION_GAP: Duration = Duration::from_millis(50);

/// Decodes one of rmcp's result types from the JSON the suite expects on the wire (most of them
/// are `#[non_exhaustive]`, and the JSON is the reference the suite is written against).
fn from_json<T: DeserializeOwned>(value: Value) -> Result<T, McpError> {
    serde_json::from_value(value).map_err(|e| McpError::internal_error(format!("fixture result: {e}"), None))
}

/// `test_sampling`'s argument.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub(super) struct SamplingArgs {
    /// The prompt to send to the client's LLM.
    prompt: String,
}

/// `test_elicitation`'s argument.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub(super) struct ElicitationArgs {
    /// The message to show the user.
    message: String,
}

#[tool_router(router = fixture_router, vis = "pub(super)")]
impl LedgerTools {
    #[tool(description = "Conformance fixture: simple text content")]
    async fn test_simple_text(&self) -> Result<CallToolResult, McpError> {
        from_json(json!({"content": [{"type": "text", "text": "This is a simple text response for testing."}]}))
    }

    #[tool(description = "Conformance fixture: image content")]
    async fn test_image_content(&self) -> Result<CallToolResult, McpError> {
        from_json(json!({"content": [{"type": "image", "data": TEST_IMAGE_BASE64, "mimeType": "image/png"}]}))
    }

    #[tool(description = "Conformance fixture: audio content")]
    async fn test_audio_content(&self) -> Result<CallToolResult, McpError> {
        from_json(json!({"content": [{"type": "audio", "data": TEST_AUDIO_BASE64, "mimeType": "audio/wav"}]}))
    }

    #[tool(description = "Conformance fixture: embedded resource content")]
    async fn test_embedded_resource(&self) -> Result<CallToolResult, McpError> {
        from_json(json!({"content": [{"type": "resource", "resource": {
            "uri": "test://embedded-resource", "mimeType": "text/plain",
            "text": "This is an embedded resource content."}}]}))
    }

    #[tool(description = "Conformance fixture: text, image and resource content in one result")]
    async fn test_multiple_content_types(&self) -> Result<CallToolResult, McpError> {
        from_json(json!({"content": [
            {"type": "text", "text": "Multiple content types test:"},
            {"type": "image", "data": TEST_IMAGE_BASE64, "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "test://mixed-content-resource",
                "mimeType": "application/json", "text": "{\"test\":\"data\",\"value\":123}"}}
        ]}))
    }

    #[tool(description = "Conformance fixture: three log notifications during the call")]
    #[allow(deprecated, reason = "logging is deprecated by SEP-2577 (2026-07-28), not in 2025-11-25")]
    async fn test_tool_with_logging(&self, peer: Peer<RoleServer>) -> Result<CallToolResult, McpError> {
        for (i, text) in
            ["Tool execution started", "Tool processing data", "Tool execution completed"].iter().enumerate()
        {
            if i > 0 {
                tokio::time::sleep(NOTIFICATION_GAP).await;
            }
            let param = from_json(json!({"level": "info", "logger": "conformance-fixtures", "data": text}))?;
            // A client that went away misses a notification; the call still answers.
            let _ = peer.notify_logging_message(param).await;
        }
        from_json(json!({"content": [{"type": "text", "text": "Tool with logging executed successfully"}]}))
    }

    #[tool(description = "Conformance fixture: progress 0, 50 and 100 of 100 when the call has a progress token")]
    async fn test_tool_with_progress(
        &self,
        peer: Peer<RoleServer>,
        meta: RequestMetaObject,
    ) -> Result<CallToolResult, McpError> {
        let token = meta.get_progress_token();
        for (i, progress) in [0u32, 50, 100].into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(NOTIFICATION_GAP).await;
            }
            if let Some(token) = &token {
                let param = from_json(json!({"progressToken": token, "progress": progress, "total": 100,
                    "message": format!("Completed step {progress} of 100")}))?;
                let _ = peer.notify_progress(param).await;
            }
        }
        let shown = token.map_or_else(|| "0".to_string(), |t| serde_json::to_string(&t).unwrap_or_default());
        from_json(json!({"content": [{"type": "text", "text": shown.trim_matches('"')}]}))
    }

    #[tool(description = "Conformance fixture: always fails with isError")]
    async fn test_error_handling(&self) -> Result<CallToolResult, McpError> {
        from_json(json!({"isError": true, "content": [{"type": "text",
            "text": "This tool intentionally returns an error for testing"}]}))
    }

    #[tool(description = "Conformance fixture: asks the client's LLM (sampling/createMessage)")]
    #[allow(deprecated, reason = "sampling is deprecated by SEP-2577 (2026-07-28), not in 2025-11-25")]
    async fn test_sampling(
        &self,
        peer: Peer<RoleServer>,
        Parameters(args): Parameters<SamplingArgs>,
    ) -> Result<CallToolResult, McpError> {
        let params =
            from_json(json!({"messages": [{"role": "user", "content": {"type": "text", "text": args.prompt}}],
            "maxTokens": 100}))?;
        let text = match peer.create_message(params).await {
            Ok(result) => {
                let v = serde_json::to_value(&result).unwrap_or_default();
                let said = v.pointer("/content/text").and_then(Value::as_str).unwrap_or("No response");
                format!("LLM response: {said}")
            }
            Err(e) => format!("Sampling not supported or error: {e}"),
        };
        from_json(json!({"content": [{"type": "text", "text": text}]}))
    }

    #[tool(description = "Conformance fixture: asks the user (elicitation/create)")]
    async fn test_elicitation(
        &self,
        peer: Peer<RoleServer>,
        Parameters(args): Parameters<ElicitationArgs>,
    ) -> Result<CallToolResult, McpError> {
        let schema = json!({"type": "object", "properties": {
            "response": {"type": "string", "description": "User's response"}}, "required": ["response"]});
        elicit(&peer, &args.message, schema, "User response").await
    }

    #[tool(description = "Conformance fixture: elicitation with default values (SEP-1034)")]
    async fn test_elicitation_sep1034_defaults(&self, peer: Peer<RoleServer>) -> Result<CallToolResult, McpError> {
        let schema = json!({"type": "object", "properties": {
            "name": {"type": "string", "description": "User name", "default": "John Doe"},
            "age": {"type": "integer", "description": "User age", "default": 30},
            "score": {"type": "number", "description": "User score", "default": 95.5},
            "status": {"type": "string", "description": "User status",
                "enum": ["active", "inactive", "pending"], "default": "active"},
            "verified": {"type": "boolean", "description": "Verification status", "default": true}
        }, "required": []});
        elicit(&peer, "Please review and update the form fields with defaults", schema, "Elicitation completed").await
    }

    #[tool(description = "Conformance fixture: elicitation with titled and multi-select enums (SEP-1330)")]
    async fn test_elicitation_sep1330_enums(&self, peer: Peer<RoleServer>) -> Result<CallToolResult, McpError> {
        elicit(&peer, "Please select options from the enum fields", sep1330_schema(), "Elicitation completed").await
    }
}

/// The form `test_elicitation_sep1330_enums` asks for: every enum shape SEP-1330 defines.
fn sep1330_schema() -> Value {
    let titled = |kind: &str| {
        json!([{"const": "value1", "title": format!("First {kind}")},
               {"const": "value2", "title": format!("Second {kind}")},
               {"const": "value3", "title": format!("Third {kind}")}])
    };
    json!({"type": "object", "properties": {
        "untitledSingle": {"type": "string", "description": "Select one option", "enum": ["option1", "option2", "option3"]},
        "titledSingle": {"type": "string", "description": "Select one option with titles", "oneOf": titled("Option")},
        "legacyEnum": {"type": "string", "description": "Select one option (legacy)", "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"]},
        "untitledMulti": {"type": "array", "description": "Select multiple options", "minItems": 1, "maxItems": 3,
            "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
        "titledMulti": {"type": "array", "description": "Select multiple options with titles", "minItems": 1,
            "maxItems": 3, "items": {"anyOf": titled("Choice")}}
    }, "required": []})
}

/// Sends `elicitation/create` with `schema` and reports the user's answer as `{prefix}: action=...`.
async fn elicit(
    peer: &Peer<RoleServer>,
    message: &str,
    schema: Value,
    prefix: &str,
) -> Result<CallToolResult, McpError> {
    let params = from_json(json!({"mode": "form", "message": message, "requestedSchema": schema}))?;
    let text = match peer.create_elicitation(params).await {
        Ok(result) => {
            let v = serde_json::to_value(&result).unwrap_or_default();
            let action = v.get("action").and_then(Value::as_str).unwrap_or("unknown");
            let content = v.get("content").cloned().unwrap_or_else(|| json!({}));
            format!("{prefix}: action={action}, content={content}")
        }
        Err(e) => format!("Elicitation not supported or error: {e}"),
    };
    from_json(json!({"content": [{"type": "text", "text": text}]}))
}

/// The fixture tools, with the input schemas their macros derive.
pub(super) fn router() -> ToolRouter<LedgerTools> {
    LedgerTools::fixture_router()
}

/// `resources/list` additions.
pub(super) fn add_resources(list: &mut ListResourcesResult) -> Result<(), McpError> {
    let fixtures: ListResourcesResult = from_json(json!({"resources": [
        {"uri": "test://static-text", "name": "static-text", "title": "Static Text Resource",
         "description": "A static text resource for testing", "mimeType": "text/plain"},
        {"uri": "test://static-binary", "name": "static-binary", "title": "Static Binary Resource",
         "description": "A static binary resource (image) for testing", "mimeType": "image/png"},
        {"uri": "test://watched-resource", "name": "watched-resource", "title": "Watched Resource",
         "description": "A resource for subscription tests", "mimeType": "text/plain"}
    ]}))?;
    list.resources.extend(fixtures.resources);
    Ok(())
}

/// `resources/templates/list` additions.
pub(super) fn add_templates(list: &mut ListResourceTemplatesResult) -> Result<(), McpError> {
    let fixtures: ListResourceTemplatesResult = from_json(json!({"resourceTemplates": [
        {"uriTemplate": "test://template/{id}/data", "name": "template", "title": "Resource Template",
         "description": "A resource template with parameter substitution", "mimeType": "application/json"}
    ]}))?;
    list.resource_templates.extend(fixtures.resource_templates);
    Ok(())
}

/// `resources/read` of a `test://` URI, or `None` for every other URI.
pub(super) fn read(uri: &str) -> Option<Result<ReadResourceResult, McpError>> {
    let contents = match uri {
        "test://static-text" => {
            json!({"uri": uri, "mimeType": "text/plain", "text": "This is the content of the static text resource."})
        }
        "test://static-binary" => json!({"uri": uri, "mimeType": "image/png", "blob": TEST_IMAGE_BASE64}),
        "test://watched-resource" => json!({"uri": uri, "mimeType": "text/plain", "text": "Watched resource content"}),
        _ => {
            let id = uri.strip_prefix("test://template/")?.strip_suffix("/data")?;
            let text = json!({"id": id, "templateTest": true, "data": format!("Data for ID: {id}")}).to_string();
            json!({"uri": uri, "mimeType": "application/json", "text": text})
        }
    };
    Some(from_json(json!({"contents": [contents]})))
}

/// `prompts/list`.
pub(super) fn prompts() -> Result<ListPromptsResult, McpError> {
    from_json(json!({"prompts": [
        {"name": "test_simple_prompt", "title": "Simple Test Prompt", "description": "A simple prompt without arguments"},
        {"name": "test_prompt_with_arguments", "title": "Prompt With Arguments",
         "description": "A prompt with required arguments", "arguments": [
            {"name": "arg1", "description": "First test argument", "required": true},
            {"name": "arg2", "description": "Second test argument", "required": true}]},
        {"name": "test_prompt_with_embedded_resource", "title": "Prompt With Embedded Resource",
         "description": "A prompt that includes an embedded resource", "arguments": [
            {"name": "resourceUri", "description": "URI of the resource to embed", "required": true}]},
        {"name": "test_prompt_with_image", "title": "Prompt With Image", "description": "A prompt that includes image content"}
    ]}))
}

/// `prompts/get`.
pub(super) fn prompt(name: &str, args: &serde_json::Map<String, Value>) -> Result<GetPromptResult, McpError> {
    let arg = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let text = |t: String| json!({"role": "user", "content": {"type": "text", "text": t}});
    let messages = match name {
        "test_simple_prompt" => json!([text("This is a simple prompt for testing.".into())]),
        "test_prompt_with_arguments" => {
            json!([text(format!("Prompt with arguments: arg1='{}', arg2='{}'", arg("arg1"), arg("arg2")))])
        }
        "test_prompt_with_embedded_resource" => json!([
            {"role": "user", "content": {"type": "resource", "resource": {"uri": arg("resourceUri"),
                "mimeType": "text/plain", "text": "Embedded resource content for testing."}}},
            text("Please process the embedded resource above.".into())
        ]),
        "test_prompt_with_image" => json!([
            {"role": "user", "content": {"type": "image", "data": TEST_IMAGE_BASE64, "mimeType": "image/png"}},
            text("Please analyze the image above.".into())
        ]),
        _ => return Err(McpError::invalid_params(format!("no prompt {name}"), Some(json!({"name": name})))),
    };
    from_json(json!({"messages": messages}))
}

/// `completion/complete`: nothing to suggest, as the reference server answers.
pub(super) fn complete() -> Result<CompleteResult, McpError> {
    from_json(json!({"completion": {"values": [], "total": 0, "hasMore": false}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_substitutes_its_id_and_other_uris_are_not_fixtures() {
        let read = read("test://template/42/data").unwrap().unwrap();
        let v = serde_json::to_value(&read).unwrap();
        let text: Value = serde_json::from_str(v["contents"][0]["text"].as_str().unwrap()).unwrap();
        assert_eq!(text["id"], "42", "{v}");
        assert!(read_is_none("ledger://capacity"));
        assert!(read_is_none("test://template/42"));
    }

    fn read_is_none(uri: &str) -> bool {
        read(uri).is_none()
    }

    #[test]
    fn prompts_take_their_arguments_and_unknown_ones_are_invalid_params() {
        let args = serde_json::Map::from_iter([("arg1".to_string(), json!("a")), ("arg2".to_string(), json!("b"))]);
        let v = serde_json::to_value(prompt("test_prompt_with_arguments", &args).unwrap()).unwrap();
        assert_eq!(v["messages"][0]["content"]["text"], "Prompt with arguments: arg1='a', arg2='b'", "{v}");
        assert_eq!(prompts().unwrap().prompts.len(), 4);
        let e = prompt("nope", &serde_json::Map::new()).unwrap_err();
        assert_eq!(e.code, rmcp::model::ErrorCode::INVALID_PARAMS);
    }

    #[test]
    fn only_the_fixtures_advertise_prompts_and_completions() {
        let shipped = serde_json::to_value(super::super::resources::capabilities(false)).unwrap();
        assert!(shipped.get("prompts").is_none() && shipped.get("completions").is_none(), "{shipped}");
        let with = serde_json::to_value(super::super::resources::capabilities(true)).unwrap();
        assert!(with["prompts"].is_object() && with["completions"].is_object(), "{with}");
        assert!(with["tools"].is_object() && with["resources"]["subscribe"] == true, "{with}");
    }

    #[test]
    fn the_fixture_tools_are_the_ones_the_suite_calls() {
        let names: Vec<String> = router().list_all().into_iter().map(|t| t.name.to_string()).collect();
        for name in ["test_simple_text", "test_tool_with_progress", "test_sampling", "test_elicitation_sep1330_enums"] {
            assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
        }
        assert_eq!(names.len(), 12);
    }
}
