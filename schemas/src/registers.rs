//! Modbus register maps: where a device keeps each metric and how to decode it.
//!
//! Encoding and decoding live here, beside the contract, so that the edge
//! node (which decodes) and the simulated devices of `testbed` (which encode)
//! can never disagree.

use serde::{Deserialize, Serialize};

use crate::metrics::Unit;

/// Which Modbus table a value lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegisterFunction {
    /// Holding registers (read 0x03, write 0x06/0x10).
    Holding,
    /// Input registers (read 0x04, read-only).
    Input,
    /// Coils (read 0x01, write 0x05), one bit.
    Coil,
    /// Discrete inputs (read 0x02, read-only), one bit.
    Discrete,
}

impl RegisterFunction {
    pub fn is_bit(self) -> bool {
        matches!(self, RegisterFunction::Coil | RegisterFunction::Discrete)
    }
    pub fn is_writable(self) -> bool {
        matches!(self, RegisterFunction::Holding | RegisterFunction::Coil)
    }
}

/// The value's type in the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegisterType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl RegisterType {
    /// How many 16-bit registers the value spans (1 for bits).
    pub fn words(self) -> u16 {
        match self {
            RegisterType::Bool | RegisterType::U16 | RegisterType::I16 => 1,
            RegisterType::U32 | RegisterType::I32 | RegisterType::F32 => 2,
        }
    }
}

/// Order of 16-bit words in a 32-bit value.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// Most significant word first (the Modbus convention, "ABCD").
    #[default]
    BigEndian,
    /// Least significant word first ("CDAB").
    LittleEndian,
}

/// Order of the two bytes inside each 16-bit word.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ByteOrder {
    #[default]
    BigEndian,
    /// Bytes swapped inside each word ("BADC" / "DCBA").
    LittleEndian,
}

fn default_scale() -> f64 {
    1.0
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_unit_id() -> u8 {
    1
}

/// One value a device exposes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterSpec {
    /// Metric name this value is reported as (e.g. `temperature`).
    pub name: String,
    /// Modbus unit (slave) id.
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    pub function: RegisterFunction,
    /// Zero-based register or bit address.
    pub address: u16,
    #[serde(rename = "type")]
    pub data_type: RegisterType,
    #[serde(default)]
    pub word_order: WordOrder,
    #[serde(default)]
    pub byte_order: ByteOrder,
    /// `value = raw * scale + offset`.
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    #[serde(default)]
    pub unit: Unit,
    /// How often to read it.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

/// A register map: every value of one device model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterMap {
    pub registers: Vec<RegisterSpec>,
}

/// Why a register map was refused; `field` is a path like `registers[2].type`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RegisterMapError {
    pub field: String,
    pub reason: String,
}

/// Why raw words could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("expected {expected} register words, got {got}")]
    WrongLength { expected: usize, got: usize },
    #[error("value {0} is not a finite number")]
    NotFinite(f64),
}

impl RegisterSpec {
    pub fn validate(&self, at: &str) -> Result<(), RegisterMapError> {
        let err = |f: &str, reason: String| {
            Err(RegisterMapError {
                field: format!("{at}.{f}"),
                reason,
            })
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return err(
                "name",
                format!(
                    "{:?} must be non-empty ascii letters, digits, '_' or '-'",
                    self.name
                ),
            );
        }
        if self.function.is_bit() != (self.data_type == RegisterType::Bool) {
            return err(
                "type",
                format!(
                    "{:?} does not fit function {:?}: coils and discrete inputs are bool, registers are numbers",
                    self.data_type, self.function
                ),
            );
        }
        if u32::from(self.address) + u32::from(self.data_type.words()) > 65_536 {
            return err(
                "address",
                format!(
                    "{} plus {} words runs past 65535",
                    self.address,
                    self.data_type.words()
                ),
            );
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            return err(
                "scale",
                format!("{} must be a finite non-zero number", self.scale),
            );
        }
        if !self.offset.is_finite() {
            return err("offset", format!("{} must be finite", self.offset));
        }
        if self.poll_ms < 10 || self.poll_ms > 86_400_000 {
            return err(
                "poll_ms",
                format!("{} must be between 10 ms and one day", self.poll_ms),
            );
        }
        if self.unit_id == 0 || self.unit_id > 247 {
            return err("unit_id", format!("{} must be 1..=247", self.unit_id));
        }
        Ok(())
    }

    /// Decode raw 16-bit words (for bits: one word, 0 or 1) into the scaled value.
    pub fn decode(&self, words: &[u16]) -> Result<f64, DecodeError> {
        let expected = usize::from(self.data_type.words());
        if words.len() != expected {
            return Err(DecodeError::WrongLength {
                expected,
                got: words.len(),
            });
        }
        let fix = |w: u16| match self.byte_order {
            ByteOrder::BigEndian => w,
            ByteOrder::LittleEndian => w.swap_bytes(),
        };
        let u32_of = || -> u32 {
            let (hi, lo) = match self.word_order {
                WordOrder::BigEndian => (fix(words[0]), fix(words[1])),
                WordOrder::LittleEndian => (fix(words[1]), fix(words[0])),
            };
            (u32::from(hi) << 16) | u32::from(lo)
        };
        let raw = match self.data_type {
            RegisterType::Bool => f64::from(u8::from(words[0] != 0)),
            RegisterType::U16 => f64::from(fix(words[0])),
            RegisterType::I16 => f64::from(fix(words[0]) as i16),
            RegisterType::U32 => f64::from(u32_of()),
            RegisterType::I32 => f64::from(u32_of() as i32),
            RegisterType::F32 => f64::from(f32::from_bits(u32_of())),
        };
        if !raw.is_finite() {
            return Err(DecodeError::NotFinite(raw));
        }
        if self.data_type == RegisterType::Bool {
            return Ok(raw);
        }
        Ok(raw * self.scale + self.offset)
    }

    /// Encode a scaled value into raw words (the inverse of [`Self::decode`],
    /// rounding to the register's resolution and saturating at its range).
    pub fn encode(&self, value: f64) -> Vec<u16> {
        let fix = |w: u16| match self.byte_order {
            ByteOrder::BigEndian => w,
            ByteOrder::LittleEndian => w.swap_bytes(),
        };
        let raw = if self.data_type == RegisterType::Bool {
            value
        } else {
            (value - self.offset) / self.scale
        };
        let split = |v: u32| -> Vec<u16> {
            let (hi, lo) = (fix((v >> 16) as u16), fix(v as u16));
            match self.word_order {
                WordOrder::BigEndian => vec![hi, lo],
                WordOrder::LittleEndian => vec![lo, hi],
            }
        };
        match self.data_type {
            RegisterType::Bool => vec![u16::from(raw != 0.0)],
            RegisterType::U16 => vec![fix(raw.round().clamp(0.0, 65_535.0) as u16)],
            RegisterType::I16 => vec![fix(raw.round().clamp(-32_768.0, 32_767.0) as i16 as u16)],
            RegisterType::U32 => split(raw.round().clamp(0.0, 4_294_967_295.0) as u32),
            RegisterType::I32 => {
                split(raw.round().clamp(-2_147_483_648.0, 2_147_483_647.0) as i32 as u32)
            }
            RegisterType::F32 => split((raw as f32).to_bits()),
        }
    }
}

impl RegisterMap {
    /// Check every register and that names are unique and ranges of one
    /// table and unit do not overlap.
    pub fn validate(&self) -> Result<(), RegisterMapError> {
        if self.registers.is_empty() {
            return Err(RegisterMapError {
                field: "registers".into(),
                reason: "a device needs at least one register".into(),
            });
        }
        for (i, r) in self.registers.iter().enumerate() {
            let at = format!("registers[{i}]");
            r.validate(&at)?;
            for (j, o) in self.registers[..i].iter().enumerate() {
                if o.name == r.name {
                    return Err(RegisterMapError {
                        field: format!("{at}.name"),
                        reason: format!("{:?} is also the name of registers[{j}]", r.name),
                    });
                }
                let same_table = o.unit_id == r.unit_id && o.function == r.function;
                let overlap = u32::from(r.address)
                    < u32::from(o.address) + u32::from(o.data_type.words())
                    && u32::from(o.address) < u32::from(r.address) + u32::from(r.data_type.words());
                if same_table && overlap {
                    return Err(RegisterMapError {
                        field: format!("{at}.address"),
                        reason: format!(
                            "{} overlaps registers[{j}] ({:?} at {})",
                            r.address, o.name, o.address
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&RegisterSpec> {
        self.registers.iter().find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(t: RegisterType, wo: WordOrder, bo: ByteOrder) -> RegisterSpec {
        RegisterSpec {
            name: "x".into(),
            unit_id: 1,
            function: if t == RegisterType::Bool {
                RegisterFunction::Coil
            } else {
                RegisterFunction::Holding
            },
            address: 10,
            data_type: t,
            word_order: wo,
            byte_order: bo,
            scale: 1.0,
            offset: 0.0,
            unit: Unit::None,
            poll_ms: 1000,
        }
    }

    #[test]
    fn decodes_known_words() {
        let mut s = spec(
            RegisterType::I16,
            WordOrder::BigEndian,
            ByteOrder::BigEndian,
        );
        assert_eq!(s.decode(&[0xFFFE]), Ok(-2.0));
        s.scale = 0.1;
        s.offset = -40.0;
        assert!((s.decode(&[625]).unwrap_or(f64::NAN) - 22.5).abs() < 1e-9);
        let f = spec(
            RegisterType::F32,
            WordOrder::BigEndian,
            ByteOrder::BigEndian,
        );
        // 1.5f32 = 0x3FC0_0000
        assert_eq!(f.decode(&[0x3FC0, 0x0000]), Ok(1.5));
        let f = spec(
            RegisterType::F32,
            WordOrder::LittleEndian,
            ByteOrder::BigEndian,
        );
        assert_eq!(f.decode(&[0x0000, 0x3FC0]), Ok(1.5));
        let f = spec(
            RegisterType::F32,
            WordOrder::BigEndian,
            ByteOrder::LittleEndian,
        );
        assert_eq!(f.decode(&[0xC03F, 0x0000]), Ok(1.5));
        let u = spec(
            RegisterType::U32,
            WordOrder::BigEndian,
            ByteOrder::BigEndian,
        );
        assert_eq!(u.decode(&[0x0001, 0x0000]), Ok(65_536.0));
        let i = spec(
            RegisterType::I32,
            WordOrder::LittleEndian,
            ByteOrder::BigEndian,
        );
        assert_eq!(i.decode(&[0xFFFF, 0xFFFF]), Ok(-1.0));
        assert_eq!(
            u.decode(&[1]),
            Err(DecodeError::WrongLength {
                expected: 2,
                got: 1
            })
        );
        let nan = spec(
            RegisterType::F32,
            WordOrder::BigEndian,
            ByteOrder::BigEndian,
        );
        assert!(matches!(
            nan.decode(&[0x7FC0, 0]),
            Err(DecodeError::NotFinite(_))
        ));
    }

    fn any_spec() -> impl Strategy<Value = RegisterSpec> {
        (
            prop_oneof![
                Just(RegisterType::U16),
                Just(RegisterType::I16),
                Just(RegisterType::U32),
                Just(RegisterType::I32),
                Just(RegisterType::F32)
            ],
            prop_oneof![Just(WordOrder::BigEndian), Just(WordOrder::LittleEndian)],
            prop_oneof![Just(ByteOrder::BigEndian), Just(ByteOrder::LittleEndian)],
        )
            .prop_map(|(t, w, b)| spec(t, w, b))
    }

    proptest! {
        #[test]
        fn encode_decode_roundtrip(s in any_spec(), v in -30_000i32..30_000) {
            let v = if s.data_type == RegisterType::U16 || s.data_type == RegisterType::U32 { f64::from(v.abs()) } else { f64::from(v) };
            let words = s.encode(v);
            prop_assert_eq!(words.len(), usize::from(s.data_type.words()));
            prop_assert_eq!(s.decode(&words).ok(), Some(v));
        }
    }

    #[test]
    fn bad_maps_are_refused_with_the_field() {
        let mut m = RegisterMap {
            registers: vec![spec(
                RegisterType::U16,
                WordOrder::BigEndian,
                ByteOrder::BigEndian,
            )],
        };
        assert!(m.validate().is_ok());
        m.registers[0].function = RegisterFunction::Coil;
        assert_eq!(m.validate().unwrap_err().field, "registers[0].type");
        m.registers[0].function = RegisterFunction::Holding;
        m.registers[0].address = 65_535;
        m.registers[0].data_type = RegisterType::F32;
        assert_eq!(m.validate().unwrap_err().field, "registers[0].address");
        m.registers[0].address = 0;
        m.registers[0].scale = 0.0;
        assert_eq!(m.validate().unwrap_err().field, "registers[0].scale");
        m.registers[0].scale = 1.0;
        m.registers[0].poll_ms = 0;
        assert_eq!(m.validate().unwrap_err().field, "registers[0].poll_ms");
        m.registers[0].poll_ms = 100;
        let mut other = m.registers[0].clone();
        other.address = 1;
        other.name = "y".into();
        m.registers.push(other.clone());
        let e = m.validate().unwrap_err();
        assert_eq!(e.field, "registers[1].address");
        assert!(e.reason.contains("overlaps"), "{e}");
        m.registers[1].address = 2;
        m.registers[1].name = "x".into();
        assert_eq!(m.validate().unwrap_err().field, "registers[1].name");
        assert!(RegisterMap::default().validate().is_err());
    }
}
