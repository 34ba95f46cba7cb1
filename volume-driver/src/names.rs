//! Volume names: the one rule every volume name follows on every backend, so that the name
//! is safe as a file name, an LV name, an NBD export name and a libvirt attribute.

/// Longest accepted volume name.
pub const MAX_NAME_LEN: usize = 64;

/// Why a volume name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("volume name is empty")]
    Empty,
    #[error("volume name '{0}' is longer than 64 characters")]
    TooLong(String),
    #[error(
        "volume name '{name}' contains '{bad}'; allowed are letters, digits, '_', '.' and '-'"
    )]
    BadCharacter { name: String, bad: char },
    #[error("volume name '{0}' is not allowed ('.' and '..' are reserved)")]
    Reserved(String),
    #[error("volume name '{0}' must not start with '-'")]
    LeadingDash(String),
}

/// Check a volume name: `[A-Za-z0-9_.-]{1,64}`, not `.` or `..`, not starting with `-`.
pub fn validate_volume_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(NameError::BadCharacter {
            name: name.to_string(),
            bad,
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.to_string()));
    }
    if name == "." || name == ".." {
        return Err(NameError::Reserved(name.to_string()));
    }
    if name.starts_with('-') {
        return Err(NameError::LeadingDash(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_pass() {
        for name in ["v1", "vm-100-disk-0", "a.b_c-D", "x", &"a".repeat(64)] {
            validate_volume_name(name).unwrap();
        }
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(validate_volume_name(""), Err(NameError::Empty));
        assert!(matches!(
            validate_volume_name(&"a".repeat(65)),
            Err(NameError::TooLong(_))
        ));
        for bad in ["a/b", "../x", "a b", "ä", "x\n", "a:b"] {
            assert!(
                matches!(
                    validate_volume_name(bad),
                    Err(NameError::BadCharacter { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            validate_volume_name(".."),
            Err(NameError::Reserved(_))
        ));
        assert!(matches!(
            validate_volume_name("."),
            Err(NameError::Reserved(_))
        ));
        assert!(matches!(
            validate_volume_name("-rf"),
            Err(NameError::LeadingDash(_))
        ));
    }
}
