//! Sizes as operators type and read them: parsing `64M`/`10GiB`/`4096`, rounding up to the
//! 4 KiB block every volume is made of, and printing sizes in binary units.

/// Every volume size is a multiple of this many bytes.
pub const BLOCK_SIZE: u64 = 4096;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size '{0}' is empty")]
    Empty(String),
    #[error(
        "size '{0}' is not a whole number with an optional K, M, G or T suffix (e.g. 64M, 10GiB)"
    )]
    Syntax(String),
    #[error("unknown size suffix '{suffix}' in '{input}' (expected K, M, G or T)")]
    Suffix { input: String, suffix: String },
    #[error("size '{0}' is too large")]
    Overflow(String),
}

/// Parse a size: plain bytes or a whole number with a binary suffix `K`, `M`, `G`, `T`
/// (case-insensitive, optionally followed by `iB` or `B`). The result is rounded up to
/// [`BLOCK_SIZE`]. `0` parses to 0; callers refuse it where it matters.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let text = input.trim();
    if text.is_empty() {
        return Err(SizeError::Empty(input.to_string()));
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits_end == 0 {
        return Err(SizeError::Syntax(input.to_string()));
    }
    let number: u64 = text[..digits_end]
        .parse()
        .map_err(|_| SizeError::Overflow(input.to_string()))?;
    let suffix = text[digits_end..].trim();
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ if suffix.starts_with('.') || suffix.starts_with(',') => {
            return Err(SizeError::Syntax(input.to_string()))
        }
        _ => {
            return Err(SizeError::Suffix {
                input: input.to_string(),
                suffix: suffix.to_string(),
            })
        }
    };
    let bytes = number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(input.to_string()))?;
    round_up_to_block(bytes).ok_or_else(|| SizeError::Overflow(input.to_string()))
}

/// Round `bytes` up to a multiple of [`BLOCK_SIZE`]; `None` on overflow.
pub fn round_up_to_block(bytes: u64) -> Option<u64> {
    bytes
        .checked_add(BLOCK_SIZE - 1)
        .map(|b| b / BLOCK_SIZE * BLOCK_SIZE)
}

/// Print a size in binary units, exact when it is a whole number of the unit
/// (`64 MiB`), else with one decimal (`3.2 GiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u64 << (10 * unit);
    if bytes.is_multiple_of(scale) {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_binary_units() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("64mb").unwrap(), 64 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("8K").unwrap(), 8192);
        assert_eq!(parse_size("8192").unwrap(), 8192);
        assert_eq!(parse_size("8192B").unwrap(), 8192);
        assert_eq!(parse_size(" 1 G ").unwrap(), 1 << 30);
    }

    #[test]
    fn sizes_round_up_to_4k() {
        assert_eq!(parse_size("1").unwrap(), 4096);
        assert_eq!(parse_size("4097").unwrap(), 8192);
        assert_eq!(parse_size("1K").unwrap(), 4096);
        assert_eq!(parse_size("0").unwrap(), 0);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(matches!(parse_size(""), Err(SizeError::Empty(_))));
        assert!(matches!(parse_size("M"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("-1G"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("10X"), Err(SizeError::Suffix { .. })));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(parse_size("10X").unwrap_err().to_string().contains("'X'"));
    }

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(3_435_973_837), "3.2 GiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
    }
}
