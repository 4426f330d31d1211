//! keyhole's text log lines, read back: the `key=value` fields of a line and
//! the "connection closed" lines a test checks outcomes and counts in.

use std::collections::HashMap;

/// The `key=value` fields of one text log line; quoted values are unquoted.
pub fn text_fields(line: &str) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key = &rest[rest[..eq].rfind(' ').map_or(0, |i| i + 1)..eq];
        let after = &rest[eq + 1..];
        let (value, remaining) = match after.strip_prefix('"') {
            Some(quoted) => {
                let mut value = String::new();
                let mut end = quoted.len();
                let mut chars = quoted.char_indices();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &quoted[end..])
            }
            None => {
                let end = after.find(' ').unwrap_or(after.len());
                (after[..end].to_string(), &after[end..])
            }
        };
        fields.insert(key.to_string(), value);
        rest = remaining;
    }
    fields
}

/// The fields of every "connection closed" line of a text log, with the
/// line's level (`INFO`, `WARN`, ...) under `level`.
pub fn closed_lines(logs: &str) -> Vec<HashMap<String, String>> {
    logs.lines()
        .filter(|l| l.contains(" connection closed "))
        .map(|line| {
            let mut fields = text_fields(line);
            if let Some(level) = line
                .split_whitespace()
                .find(|w| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(w))
            {
                fields.insert("level".to_owned(), level.to_owned());
            }
            fields
        })
        .collect()
}

pub fn field<'a>(fields: &'a HashMap<String, String>, key: &str) -> &'a str {
    fields.get(key).map_or("", String::as_str)
}
