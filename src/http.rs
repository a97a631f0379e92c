//! What the two HTTP answerers (the WebSocket port's refusals in `server`,
//! the admin listener) share: the reason phrase of a status code.

/// The canonical reason phrase of `status` ("Not Found"), or "" for a code
/// that has none (an HTTP/1.1 status line may leave it empty).
pub fn reason_phrase(status: u16) -> &'static str {
    tungstenite::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases() {
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(401), "Unauthorized");
        assert_eq!(reason_phrase(408), "Request Timeout");
        assert_eq!(reason_phrase(429), "Too Many Requests");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(503), "Service Unavailable");
        assert_eq!(reason_phrase(599), "");
    }
}
