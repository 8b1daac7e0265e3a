//! Secrets in configuration: what `idem check-config` hides.

use super::{Config, SinkConfig};

/// The effective configuration as TOML, defaults filled in, secrets
/// redacted: what `idem check-config` prints.
pub fn describe(config: &Config) -> String {
    let mut shown = config.clone();
    for (key, value) in shown.kafka.properties.iter_mut() {
        if is_secret(key) {
            *value = "<redacted>".to_string();
        }
    }
    match &mut shown.sink {
        SinkConfig::Postgres(pg) => pg.url = redact_url_password(&pg.url),
        SinkConfig::Http(http) => {
            http.url = redact_url(&http.url);
            for (name, value) in http.headers.iter_mut() {
                if is_secret(name) || name.eq_ignore_ascii_case("cookie") {
                    *value = "<redacted>".to_string();
                }
            }
        }
        _ => {}
    }
    toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("{shown:#?}\n({e})"))
}

/// `postgresql://user:secret@host/db` becomes `postgresql://user:<redacted>@host/db`.
pub fn redact_url_password(url: &str) -> String {
    // The user part ends at the last `@` with no `/` before it: a
    // password may hold `?`, `#` or `@` (PostgreSQL takes them unescaped).
    let (head, rest) = match url.split_once("://") {
        Some((scheme, rest)) => {
            let userinfo_end = rest
                .char_indices()
                .take_while(|(_, c)| *c != '/')
                .filter(|(_, c)| *c == '@')
                .last()
                .map(|(i, _)| i);
            match userinfo_end {
                Some(at) => {
                    let userinfo = &rest[..at];
                    let shown = match userinfo.split_once(':') {
                        Some((user, _)) => format!("{user}:<redacted>"),
                        None => userinfo.to_string(),
                    };
                    (format!("{scheme}://{shown}@"), &rest[at + 1..])
                }
                None => (format!("{scheme}://"), rest),
            }
        }
        None => (String::new(), url),
    };
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let mut out = head + base;
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_secret(k) => {
                    format!("{k}=<redacted>")
                }
                _ => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// A URL for logs and messages: a password or a bare user part (often a
/// token) and secret-named query parameters redacted.
pub fn redact_url(url: &str) -> String {
    let redacted = redact_url_password(url);
    let Some((scheme, rest)) = redacted.split_once("://") else {
        return redacted;
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) if !userinfo.contains(':') => {
            format!("{scheme}://<redacted>@{host}{}", &rest[authority_end..])
        }
        _ => redacted,
    }
}

pub(crate) fn is_secret(property: &str) -> bool {
    let p = property.to_ascii_lowercase();
    [
        "password",
        "secret",
        "sasl.jaas",
        "key.pem",
        "token",
        "api-key",
        "apikey",
        "api_key",
        "access_key",
        "oauthbearer.config",
        "authorization",
        "signature",
        "credential",
    ]
    .iter()
    .any(|s| p.contains(s))
        || ["key", "sig", "auth", "code", "pass", "pwd"].contains(&p.as_str())
}
