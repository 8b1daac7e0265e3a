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
                if is_secret(name) || name.eq_ignore_ascii_case("authorization") {
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
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://").and_then(|(scheme, rest)| {
        let (userinfo, host) = rest.rsplit_once('@')?;
        let (user, _) = userinfo.split_once(':')?;
        Some(format!("{scheme}://{user}:<redacted>@{host}"))
    }) {
        Some(redacted) => redacted,
        None => base.to_string(),
    };
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
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| p.contains(s))
}
