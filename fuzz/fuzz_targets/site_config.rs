//! Site configuration files: TOML into `SiteConfig`, then `validate`.
//! The harness is `causalkv::fuzzing::site_config`, which the regression test replays too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| causalkv::fuzzing::site_config(data));
