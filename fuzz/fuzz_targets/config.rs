//! Config parse + validate (src/config.rs `parse`, `Config::validate`), what `check` and
//! startup run on an operator's file. Must never panic, whatever the file says.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // validate() opens the files the config names (TLS, CDP key). Keep the fuzzer away
    // from devices and pseudo-files, where an open could block or read without end.
    if ["/dev", "/proc", "/sys", "dev/", "proc/", "sys/"]
        .iter()
        .any(|p| text.contains(p))
    {
        return;
    }
    let Ok(config) = onramp_gateway::config::parse(text) else {
        return;
    };
    // A directory with nothing in it: relative paths resolve to files that do not exist.
    let _ = config.validate(Path::new("/nonexistent-fuzz-base"));
});
