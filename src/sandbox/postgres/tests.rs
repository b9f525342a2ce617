use super::*;

#[test]
fn json_variant_replaces_only_extra() {
    let jsonb = events_table_sql(ExtraType::Jsonb);
    let json = events_table_sql(ExtraType::Json);
    assert_eq!(jsonb.matches("\"extra\" jsonb,").count(), 1);
    assert!(json.contains("\"extra\" json,"));
    assert!(!json.contains("\"extra\" jsonb"));
    assert_eq!(jsonb.len(), json.len() + 1);
}

#[test]
fn shell_quoting() {
    assert_eq!(sh_quote("/tmp/a b"), "'/tmp/a b'");
    assert_eq!(sh_quote("it's"), "'it'\\''s'");
}
