//! A short account of how two network specs differ, for errors about a
//! checkpoint trained with another network than the one given.
//!
//! Both specs are compared in their serde JSON form, the form that checkpoints
//! store. Nested objects such as `train` are compared field by field, so a
//! difference is named by its dotted path, as `--set` names fields.

use ldnc_ir::spec::NetSpec;
use serde_json::Value;

/// Lists the fields in which `checkpoint` differs from `current`, the network
/// that the command runs, each with both values, e.g.
/// `blocks: [2, 2, 2] in the checkpoint, [4, 4, 4] here`.
pub fn describe_difference(checkpoint: &NetSpec, current: &NetSpec) -> String {
    let checkpoint = serde_json::to_value(checkpoint).expect("NetSpec always serialises to JSON");
    let current = serde_json::to_value(current).expect("NetSpec always serialises to JSON");
    let mut differences = Vec::new();
    collect_differences("", &checkpoint, &current, &mut differences);
    if differences.is_empty() {
        // `NetSpec`'s equality compares floats as floats, so NaN differs from
        // itself while the JSON forms agree.
        return "no field differs in the JSON form".to_string();
    }
    differences.join("; ")
}

/// Appends one entry per differing field below `path` to `differences`.
/// Objects recurse field by field, and any other pair differs as a whole.
fn collect_differences(path: &str, a: &Value, b: &Value, differences: &mut Vec<String>) {
    if let (Value::Object(a_fields), Value::Object(b_fields)) = (a, b) {
        let mut keys: Vec<&String> = a_fields.keys().chain(b_fields.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let field = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            let missing = Value::Null;
            let a_value = a_fields.get(key).unwrap_or(&missing);
            let b_value = b_fields.get(key).unwrap_or(&missing);
            collect_differences(&field, a_value, b_value, differences);
        }
        return;
    }
    if a != b {
        differences.push(format!(
            "{path}: {} in the checkpoint, {} here",
            render(a),
            render(b)
        ));
    }
}

/// Formats a JSON value compactly in the style of the network files: lists as
/// `[2, 2, 2]`, `null` as `None`, and objects as `{key: value}`.
fn render(value: &Value) -> String {
    match value {
        Value::Null => "None".to_string(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(render).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|(key, value)| format!("{key}: {}", render(value)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        Value::String(_) | Value::Bool(_) | Value::Number(_) => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> NetSpec {
        NetSpec::from_ron(text, "test.ron").unwrap()
    }

    #[test]
    fn lists_each_differing_field() {
        let checkpoint =
            spec("(name: \"quickstart\", blocks: [2, 2, 2], growth: 8, bottleneck: None)");
        let here =
            spec("(name: \"quickstart\", blocks: [4, 4, 4], growth: 8, bottleneck: Some(2))");
        let text = describe_difference(&checkpoint, &here);
        assert!(
            text.contains("blocks: [2, 2, 2] in the checkpoint, [4, 4, 4] here"),
            "{text}"
        );
        assert!(
            text.contains("bottleneck: None in the checkpoint, 2 here"),
            "{text}"
        );
        assert!(!text.contains("name"), "{text}");
        assert!(!text.contains("growth"), "{text}");
    }

    #[test]
    fn nested_fields_use_dotted_paths() {
        let checkpoint = spec("(blocks: [2], growth: 8)");
        let here = checkpoint
            .with_overrides(&["train.lr=0.5".to_string()])
            .unwrap();
        let text = describe_difference(&checkpoint, &here);
        assert!(text.starts_with("train.lr: "), "{text}");
        assert!(text.ends_with(", 0.5 here"), "{text}");
        assert!(!text.contains(';'), "{text}");
    }

    #[test]
    fn changed_variant_shows_both() {
        let checkpoint = spec("(blocks: [2], growth: 8, stem: Cifar)");
        let here = spec("(blocks: [2], growth: 8, stem: Plain)");
        let text = describe_difference(&checkpoint, &here);
        assert_eq!(text, "stem: \"Cifar\" in the checkpoint, \"Plain\" here");
    }
}
