//! lockstep: a staged rollout controller that locks IAM users to trusted networks.
//!
//! The library holds the functional core (configuration, the perimeter rule, evidence
//! aggregation, the planner and the guard) and the edges behind small traits (AWS, the store,
//! the clock). The `lockstep` binary is the imperative shell around it.

// Every public item says what it is for: `cargo clippy -D warnings` turns this into an error.
#![warn(missing_docs)]

/// Declares an enum whose variants have stable snake_case names, used in output, metric labels
/// and the store: `as_str`, `from_name`, `ALL`, `Display`, `Serialize` and `Deserialize` come with it.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vmeta])* $variant,)* }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The variant's stable name (in the store, metrics labels and JSON).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }

            /// The variant with this name, if any.
            pub fn from_name(text: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.as_str() == text)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                $name::from_name(&text).ok_or_else(|| serde::de::Error::unknown_variant(&text, &[$($text,)*]))
            }
        }
    };
}

pub mod api;
pub(crate) mod athena;
pub mod aws;
pub mod backtest;
pub mod clock;
pub mod config;
pub mod controller;
pub mod duration;
pub mod evidence;
pub mod exemption;
pub mod feed;
pub mod fleet;
pub mod guard;
pub mod iam;
pub mod metrics;
pub(crate) mod notify;
pub mod organizations;
pub mod perimeter;
pub mod planner;
pub mod rollout;
pub mod runtime;
pub mod store;
#[cfg(any(test, feature = "test-support"))]
pub mod testkit;
pub mod trail;
