//! USD amounts as users write them: decimal strings (`"12.5"`) or numbers, read by their
//! decimal text so no float ever touches an amount.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use tollgate_core::tier::PPM;
use tollgate_core::{MoneyError, Nanos};

/// An amount as written: its decimal text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdInput(String);

impl UsdInput {
    pub fn new(text: impl Into<String>) -> UsdInput {
        UsdInput(text.into())
    }

    pub fn text(&self) -> String {
        self.0.clone()
    }

    pub fn nanos(&self) -> Result<Nanos, MoneyError> {
        Nanos::parse_usd(&self.0)
    }
}

/// serde_json (with `arbitrary_precision`) hands a number over as a one-entry map under this
/// key, with the number's exact text as the value.
const JSON_NUMBER_TOKEN: &str = "$serde_json::private::Number";

impl<'de> Deserialize<'de> for UsdInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UsdInput;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a USD amount as a decimal string such as \"12.5\" or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UsdInput, E> {
                Ok(UsdInput(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<UsdInput, E> {
                Ok(UsdInput(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<UsdInput, E> {
                Ok(UsdInput(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<UsdInput, E> {
                Err(E::custom(format!(
                    "{v} is a floating-point number; write amounts as strings, e.g. \"{v}\", so they stay exact"
                )))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsdInput, A::Error> {
                match map.next_key::<String>()? {
                    Some(k) if k == JSON_NUMBER_TOKEN => Ok(UsdInput(map.next_value::<String>()?)),
                    _ => Err(de::Error::custom("expected a USD amount, found an object")),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for UsdInput {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A multiplier such as `1.5` in millionths (1_500_000). At most six decimals, 0 < m ≤ 100.
pub fn parse_multiplier_ppm(text: &str) -> Result<u64, String> {
    // A multiplier has the shape of an amount; reuse the exact decimal parser (nine decimals),
    // then require that it is a whole number of millionths.
    let n = Nanos::parse_usd(text).map_err(|_| format!("{text:?} is not a number such as 1.5"))?;
    if n.0 <= 0 || n.0 > 100 * 1_000_000_000 {
        return Err(format!("{text} must be above 0 and at most 100"));
    }
    if n.0 % 1000 != 0 {
        return Err(format!("{text} has more than 6 decimals"));
    }
    Ok(n.0 as u64 / 1000 * PPM / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers_and_strings_are_read_exactly() {
        let v: Vec<UsdInput> = serde_json::from_str(r#"["12.5", 0.1, 3, 0.000000001, 1e2]"#).unwrap();
        let nanos: Vec<_> = v.iter().map(|u| u.nanos()).collect();
        assert_eq!(nanos[0], Ok(Nanos(12_500_000_000)));
        assert_eq!(nanos[1], Ok(Nanos(100_000_000)));
        assert_eq!(nanos[2], Ok(Nanos(3_000_000_000)));
        assert_eq!(nanos[3], Ok(Nanos(1)));
        // An exponent is not a plain decimal amount: refused with a message, not misread.
        assert!(nanos[4].is_err());
    }

    #[test]
    fn toml_floats_are_refused_with_advice() {
        #[derive(Deserialize, Debug)]
        struct T {
            #[allow(dead_code, reason = "read only through the Deserialize it derives")]
            a: UsdInput,
        }
        let e = toml::from_str::<T>("a = 0.1").unwrap_err().to_string();
        assert!(e.contains("write amounts as strings"), "{e}");
        assert_eq!(toml::from_str::<T>("a = \"0.1\"").unwrap().a.nanos(), Ok(Nanos(100_000_000)));
        assert_eq!(toml::from_str::<T>("a = 7").unwrap().a.nanos(), Ok(Nanos(7_000_000_000)));
    }

    #[test]
    fn multipliers() {
        assert_eq!(parse_multiplier_ppm("1.5"), Ok(1_500_000));
        assert_eq!(parse_multiplier_ppm("1"), Ok(1_000_000));
        assert!(parse_multiplier_ppm("0").is_err());
        assert!(parse_multiplier_ppm("1.0000001").is_err());
    }
}
