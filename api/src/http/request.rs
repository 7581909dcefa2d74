//! HTTP/1.1 request framing around `httparse`: the head is parsed by httparse, and this module
//! adds what a server must decide itself: the body length (Content-Length only; chunked bodies
//! are refused), persistence (`Connection`, HTTP/1.0), `Expect: 100-continue`, and size limits.

/// Most header lines accepted.
const MAX_HEADERS: usize = 32;

/// Why a request cannot be served; the connection is closed after the error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// Not valid HTTP/1.x.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// The head (request line + headers) is too large or has too many headers.
    #[error("request head too large (at most {max} bytes and {MAX_HEADERS} headers)")]
    HeadTooLarge {
        /// The limit.
        max: usize,
    },
    /// The announced body is too large.
    #[error("request body too large: {len} bytes (at most {max})")]
    BodyTooLarge {
        /// Content-Length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// `Transfer-Encoding` (chunked bodies): not supported, send Content-Length instead.
    #[error("Transfer-Encoding is not supported; send the body with Content-Length")]
    TransferEncoding,
}

impl RequestError {
    /// The HTTP status that fits.
    pub(crate) fn status(&self) -> u16 {
        match self {
            RequestError::Malformed(_) => 400,
            RequestError::HeadTooLarge { .. } => 431,
            RequestError::BodyTooLarge { .. } => 413,
            RequestError::TransferEncoding => 501,
        }
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    /// The method, as sent (methods are case-sensitive).
    pub(crate) method: String,
    /// The path, without any query string.
    pub(crate) path: String,
    /// Whether the connection stays open after the response.
    pub(crate) keep_alive: bool,
    /// The body's length.
    pub(crate) content_length: usize,
    /// The client waits for `100 Continue` before sending the body.
    pub(crate) expect_continue: bool,
}

/// What the front of the input holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Not a complete head yet.
    Partial,
    /// A head, and how many bytes it took.
    Head(Head, usize),
}

fn has_token(value: &[u8], token: &str) -> bool {
    String::from_utf8_lossy(value)
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses the request head at the front of `buf`.
pub(crate) fn parse_head(
    buf: &[u8],
    max_head: usize,
    max_body: usize,
) -> Result<Parsed, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > max_head {
                Err(RequestError::HeadTooLarge { max: max_head })
            } else {
                Ok(Parsed::Partial)
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::HeadTooLarge { max: max_head })
        }
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    if n > max_head {
        return Err(RequestError::HeadTooLarge { max: max_head });
    }
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let http11 = req.version == Some(1);
    let mut keep_alive = http11;
    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).unwrap_or("").trim();
            let len = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                text.parse::<u64>().ok()
            } else {
                None
            };
            match (len, content_length) {
                (None, _) => {
                    return Err(RequestError::Malformed(format!(
                        "invalid Content-Length `{}`",
                        String::from_utf8_lossy(h.value)
                    )))
                }
                (Some(a), Some(b)) if a != b => {
                    return Err(RequestError::Malformed(
                        "conflicting Content-Length headers".into(),
                    ))
                }
                (Some(a), _) => content_length = Some(a),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(RequestError::TransferEncoding);
        } else if h.name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, "close") {
                keep_alive = false;
            } else if has_token(h.value, "keep-alive") {
                keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("expect") && has_token(h.value, "100-continue") {
            expect_continue = http11;
        }
    }
    let len = content_length.unwrap_or(0);
    if len > max_body as u64 {
        return Err(RequestError::BodyTooLarge { len, max: max_body });
    }
    Ok(Parsed::Head(
        Head {
            method,
            path,
            keep_alive,
            content_length: len as usize,
            expect_continue,
        },
        n,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Parsed, RequestError> {
        parse_head(raw.as_bytes(), 1024, 100)
    }

    #[test]
    fn parses_a_simple_request() {
        let raw = "PUT /vm/pause?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}";
        let Parsed::Head(h, n) = head(raw).unwrap() else {
            panic!()
        };
        assert_eq!(h.method, "PUT");
        assert_eq!(h.path, "/vm/pause");
        assert!(h.keep_alive);
        assert_eq!(h.content_length, 2);
        assert_eq!(&raw[n..], "{}");
    }

    #[test]
    fn partial_and_oversized_heads() {
        assert_eq!(
            head("GET /vm HTTP/1.1\r\nHost: x\r\n").unwrap(),
            Parsed::Partial
        );
        let big = format!("GET /vm HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert!(matches!(head(&big), Err(RequestError::HeadTooLarge { .. })));
        let many: String = (0..40).map(|i| format!("X{i}: y\r\n")).collect();
        let raw = format!("GET /vm HTTP/1.1\r\n{many}\r\n");
        assert_eq!(head(&raw).unwrap_err().status(), 431);
    }

    #[test]
    fn connection_semantics() {
        let Parsed::Head(h, _) = head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").unwrap()
        else {
            panic!()
        };
        assert!(!h.keep_alive);
        let Parsed::Head(h, _) = head("GET / HTTP/1.0\r\n\r\n").unwrap() else {
            panic!()
        };
        assert!(!h.keep_alive);
        let Parsed::Head(h, _) = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap()
        else {
            panic!()
        };
        assert!(h.keep_alive);
        let Parsed::Head(h, _) =
            head("PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n").unwrap()
        else {
            panic!()
        };
        assert!(h.expect_continue);
    }

    #[test]
    fn bad_lengths_and_encodings() {
        assert_eq!(
            head("PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            head("PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            head("PUT / HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
                .unwrap_err()
                .status(),
            413
        );
        assert_eq!(
            head("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap_err()
                .status(),
            501
        );
        assert_eq!(head("\x01garbage\r\n\r\n").unwrap_err().status(), 400);
    }
}
