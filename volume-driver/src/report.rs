//! Rendering an error and its `source()` chain as the one line an operator reads.

/// `outer: cause: root cause`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_is_joined_on_one_line() {
        let e = crate::store::StoreError::Io {
            op: "write",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let line = error_chain(&e);
        assert!(
            line.starts_with("cannot write /x: No space left on device"),
            "{line}"
        );
    }
}
