//! Quoting user input in error messages: one helper, so every error that echoes a
//! name, path or pattern stays short however long the input was.

/// Longest input echoed whole, in bytes.
pub const MAX_ECHO: usize = 96;

/// `s` as it is when it is at most [`MAX_ECHO`] bytes; otherwise its first bytes (cut
/// at a character boundary) followed by `…(N bytes)`.
pub fn cut(s: &str) -> String {
    if s.len() <= MAX_ECHO {
        return s.to_owned();
    }
    let mut end = MAX_ECHO;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &s[..end], s.len())
}

/// [`cut`] of `s`, in quotes (`{:?}` style, so control characters are escaped).
pub fn quoted(s: &str) -> String {
    let c = cut(s);
    if c.len() == s.len() {
        format!("{s:?}")
    } else {
        let head = &s[..c.find('…').unwrap_or(c.len())];
        format!("{head:?}…({} bytes)", s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_unchanged() {
        assert_eq!(cut("md0"), "md0");
        assert_eq!(quoted("md0"), "\"md0\"");
    }

    #[test]
    fn long_input_cut() {
        let long = "x".repeat(10_000);
        let c = cut(&long);
        assert!(c.len() < 130, "{c}");
        assert!(c.ends_with("…(10000 bytes)"), "{c}");
        let q = quoted(&long);
        assert!(q.len() < 130 && q.starts_with('"'), "{q}");
        // A multi-byte character at the cut is not split.
        let s = format!("{}é{}", "a".repeat(MAX_ECHO - 1), "b".repeat(50));
        assert!(cut(&s).starts_with(&"a".repeat(MAX_ECHO - 1)));
    }
}
