//! Store URL parsing (`StoreUrl`, from `store.url` in the config or
//! `TIDEMARK_STORE__URL`) and the redaction of PostgreSQL passwords in messages.
//!
//! Properties: nothing panics; a password given in the URL's user info never
//! appears in the error for a bad URL, in `Debug` of the parsed options, or in
//! `postgres::redact`; an accepted SQLite URL has a non-empty path taken from the
//! URL.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tidemark_store::StoreUrl;
use tidemark_store::postgres::redact;

/// Marks the password so it can be looked for in every message.
const SECRET: &str = "Pw0SECRET";

#[derive(Debug, Arbitrary)]
struct Input {
    raw: String,
    user: String,
    password: String,
    host: String,
    rest: String,
    scheme: u8,
}

fn no_secret(what: &str, text: &str, url: &str) {
    assert!(!text.contains(SECRET), "{what} shows the password of {url:?}: {text}");
}

fuzz_target!(|input: Input| {
    // Any text at all.
    match input.raw.parse::<StoreUrl>() {
        Ok(StoreUrl::Sqlite(o)) => {
            assert!(!o.path.as_os_str().is_empty());
            assert!(input.raw.contains(o.path.to_str().expect("path from a str")));
        }
        Ok(StoreUrl::Postgres(o)) => assert_eq!(o.url, input.raw),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = redact(&input.raw);

    // A PostgreSQL URL whose user info carries a password.
    if [&input.user, &input.host, &input.rest]
        .iter()
        .any(|s| s.contains(SECRET) || s.contains('@') || s.contains('/'))
        || input.user.contains(':')
        || input.password.contains('@')
    {
        return;
    }
    let scheme = if input.scheme % 2 == 0 { "postgres" } else { "postgresql" };
    let url = format!(
        "{scheme}://{}:{SECRET}{}@{}/{}",
        input.user, input.password, input.host, input.rest
    );
    no_secret("redact", &redact(&url), &url);
    match url.parse::<StoreUrl>() {
        Ok(parsed) => no_secret("Debug of the options", &format!("{parsed:?}"), &url),
        Err(e) => no_secret("the error", &e.to_string(), &url),
    }
});
