//! Config parsing: any text must give a config or an error that names a
//! field, never a panic; a config that loads must print (as `idem
//! check-config` does) without a panic, and its full TOML must load again
//! to the same config.

#![no_main]

use std::path::Path;

use idem::config::{describe, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => config,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let shown = describe(&config);
    assert!(!shown.is_empty());

    // What check-config prints, minus the redaction, loads again alike.
    let full = toml::to_string_pretty(&config).expect("a loaded config serialises");
    let again = Config::parse(&full, Path::new("printed.toml"))
        .unwrap_or_else(|e| panic!("printed config does not load: {e}\n{full}"));
    assert_eq!(
        describe(&again),
        shown,
        "printing and loading changed the config"
    );
});
