//! Money as an integer count of nano-USD (1e-9 USD), with checked arithmetic and the one place
//! where USD amounts are parsed from and formatted to decimal strings.

use std::fmt;

/// An amount of money in nano-USD. Arithmetic is checked: an overflow is a value, never a wrap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(pub i64);

/// Nano-USD in one USD.
pub const NANOS_PER_USD: i64 = 1_000_000_000;

/// Why a USD string was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoneyError {
    /// Nothing to parse: the string is empty or all whitespace.
    Empty,
    /// Not a plain decimal number such as `12.5` or `0.000123`.
    Malformed(String),
    /// More than nine digits after the decimal point: finer than one nano-USD.
    TooPrecise(String),
    /// Beyond what the ledger can hold (about 9.2 billion USD).
    TooLarge(String),
}

impl fmt::Display for MoneyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MoneyError::Empty => write!(f, "empty amount: give a decimal number of USD such as \"12.5\""),
            MoneyError::Malformed(s) => {
                write!(f, "{s:?} is not a USD amount: give a decimal number such as \"12.5\" or \"0.000123\"")
            }
            MoneyError::TooPrecise(s) => {
                write!(f, "{s:?} has more than 9 decimal places: amounts are exact to 1 nano-USD (0.000000001)")
            }
            MoneyError::TooLarge(s) => write!(f, "{s:?} is too large: amounts are limited to 9,000,000,000 USD"),
        }
    }
}

impl std::error::Error for MoneyError {}

impl Nanos {
    /// Zero USD.
    pub const ZERO: Nanos = Nanos(0);
    /// The largest amount the ledger can hold (about 9.2 billion USD).
    pub const MAX: Nanos = Nanos(i64::MAX);

    /// `usd` whole USD. Unchecked: for constants and figures known to be in range, not for input.
    pub const fn from_usd(usd: i64) -> Nanos {
        Nanos(usd * NANOS_PER_USD)
    }

    /// `self + other`; None on overflow.
    pub fn checked_add(self, other: Nanos) -> Option<Nanos> {
        self.0.checked_add(other.0).map(Nanos)
    }

    /// `self - other`; None on overflow.
    pub fn checked_sub(self, other: Nanos) -> Option<Nanos> {
        self.0.checked_sub(other.0).map(Nanos)
    }

    /// `self - other`, but never below zero.
    pub fn saturating_sub_floor(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(other.0).max(0))
    }

    /// `self + other`, clamped to the range instead of overflowing.
    pub fn saturating_add(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(other.0))
    }

    /// Whether the amount is below zero.
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Parses a decimal USD string: optional sign, digits, optional point and up to nine
    /// decimals. No exponents, no thousands separators, no currency signs.
    pub fn parse_usd(text: &str) -> Result<Nanos, MoneyError> {
        let s = text.trim();
        if s.is_empty() {
            return Err(MoneyError::Empty);
        }
        let (negative, digits) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let (whole, frac) = match digits.split_once('.') {
            Some((w, f)) => (w, f),
            None => (digits, ""),
        };
        let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && frac.is_empty()) || !all_digits(whole) || !all_digits(frac) {
            return Err(MoneyError::Malformed(text.to_string()));
        }
        if digits.ends_with('.') && frac.is_empty() && whole.is_empty() {
            return Err(MoneyError::Malformed(text.to_string()));
        }
        let frac_trimmed = frac.trim_end_matches('0');
        if frac_trimmed.len() > 9 {
            return Err(MoneyError::TooPrecise(text.to_string()));
        }
        let too_large = || MoneyError::TooLarge(text.to_string());
        let whole_value: i64 = if whole.is_empty() {
            0
        } else {
            whole
                .trim_start_matches('0')
                .parse::<i64>()
                .or_else(|_| if whole.trim_start_matches('0').is_empty() { Ok(0) } else { Err(too_large()) })?
        };
        let mut frac_value: i64 = 0;
        for (i, b) in frac_trimmed.bytes().enumerate() {
            frac_value += i64::from(b - b'0') * 10i64.pow(8 - i as u32);
        }
        let value =
            whole_value.checked_mul(NANOS_PER_USD).and_then(|w| w.checked_add(frac_value)).ok_or_else(too_large)?;
        Ok(Nanos(if negative { -value } else { value }))
    }

    /// Formats for people: `$50.00`, `$0.50`, `$0.000123` (at least two decimals).
    pub fn to_dollars(self) -> String {
        let plain = self.to_string();
        let (sign, digits) = match plain.strip_prefix('-') {
            Some(d) => ("-", d.to_string()),
            None => ("", plain),
        };
        let padded = match digits.split_once('.') {
            None => format!("{digits}.00"),
            Some((w, f)) if f.len() < 2 => format!("{w}.{f:0<2}"),
            Some(_) => digits,
        };
        format!("{sign}${padded}")
    }

    /// Multiplies by `num / den` and rounds half away from zero, exactly.
    pub fn mul_ratio_round(self, num: u64, den: u64) -> Option<Nanos> {
        debug_assert!(den > 0);
        let n = i128::from(self.0).checked_mul(i128::from(num))?;
        let d = i128::from(den);
        let q = if n >= 0 { (n + d / 2) / d } else { -((-n + d / 2) / d) };
        i64::try_from(q).ok().map(Nanos)
    }
}

impl fmt::Display for Nanos {
    /// Formats as a plain decimal USD string without trailing zeros: `12.5`, `0`, `0.000123`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = i128::from(self.0);
        let sign = if v < 0 { "-" } else { "" };
        let a = v.unsigned_abs();
        let whole = a / NANOS_PER_USD as u128;
        let frac = a % NANOS_PER_USD as u128;
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_exactly() {
        let cases = [
            ("12.5", 12_500_000_000),
            ("0.000123", 123_000),
            ("0", 0),
            ("-1.2", -1_200_000_000),
            ("0.000000001", 1),
            (".5", 500_000_000),
            ("7.", 7_000_000_000),
            ("100.000000000", 100_000_000_000),
            ("0009", 9_000_000_000),
        ];
        for (text, nanos) in cases {
            assert_eq!(Nanos::parse_usd(text), Ok(Nanos(nanos)), "{text}");
        }
        assert_eq!(Nanos(12_500_000_000).to_string(), "12.5");
        assert_eq!(Nanos(123_000).to_string(), "0.000123");
        assert_eq!(Nanos(0).to_string(), "0");
        assert_eq!(Nanos(-1_200_000_000).to_string(), "-1.2");
        assert_eq!(Nanos(1).to_string(), "0.000000001");
        assert_eq!(Nanos(i64::MIN).to_string(), "-9223372036.854775808");
    }

    #[test]
    fn refuses_what_is_not_an_amount() {
        for bad in ["", "abc", "1e5", "1,000", "$5", "--1", ".", "1.2.3", " - "] {
            assert!(Nanos::parse_usd(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(matches!(Nanos::parse_usd("0.0000000001"), Err(MoneyError::TooPrecise(_))));
        assert!(matches!(Nanos::parse_usd("10000000000"), Err(MoneyError::TooLarge(_))));
    }

    #[test]
    fn dollars_for_people() {
        assert_eq!(Nanos::from_usd(50).to_dollars(), "$50.00");
        assert_eq!(Nanos(500_000_000).to_dollars(), "$0.50");
        assert_eq!(Nanos(123_000).to_dollars(), "$0.000123");
        assert_eq!(Nanos(-1_500_000_000).to_dollars(), "-$1.50");
    }

    #[test]
    fn ratio_rounds_half_up() {
        assert_eq!(Nanos(3).mul_ratio_round(1, 2), Some(Nanos(2)));
        assert_eq!(Nanos(5).mul_ratio_round(11, 10), Some(Nanos(6)));
        assert_eq!(Nanos(-3).mul_ratio_round(1, 2), Some(Nanos(-2)));
        assert_eq!(Nanos(i64::MAX).mul_ratio_round(2, 1), None);
    }
}
