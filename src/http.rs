//! The little HTTP both listeners share.

/// The reason phrase for a status code, from one table (the `http` crate's).
pub fn reason_phrase(status: u16) -> &'static str {
    tungstenite::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}
