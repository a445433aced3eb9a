//! Settings with a fixed set of words (`word_enum!`): the one place where an enum's words for
//! the command line, configuration files and messages are written.

/// Defines a setting with a fixed set of words: serde and clap use the words, `name()` and
/// `Display` give the word, `FromStr` parses it (the error lists the choices).
macro_rules! word_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $var:ident => $word:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $word)] #[value(name = $word)] $var, )+
        }

        impl $name {
            /// Every choice, in the order `--help` lists them.
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// The word of this choice (as in `config.json` and on the command line).
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$var => $word, )+
                }
            }

            /// The words of all choices, comma-separated.
            pub fn choices() -> String {
                Self::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
            }
        }

        /// Reads the word as `FromStr` does, so a misspelt word in a configuration file gets
        /// the same error (the choices and a suggestion) as on the command line.
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let word = <String as serde::Deserialize>::deserialize(d)?;
                word.parse().map_err(serde::de::Error::custom)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> anyhow::Result<Self> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| {
                        let hint = $crate::suggest::did_you_mean(s, Self::ALL.iter().map(|v| v.name()));
                        anyhow::anyhow!("unknown {} '{s}' (one of {}){hint}", $what, Self::choices())
                    })
            }
        }
    };
}
