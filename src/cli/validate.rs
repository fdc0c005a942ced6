//! `ferry validate -c FILE`.

use std::path::Path;

use crate::config::{self, EXIT_CONFIG, Interpolator};

pub fn validate(path: &Path, env_optional: bool) -> i32 {
    let mut interpolator = Interpolator::from_env();
    interpolator.env_optional = env_optional;
    match config::load_with_warnings(path, &interpolator) {
        Ok(config::Loaded { config: c, warnings }) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: ok ({} route{})",
                path.display(),
                c.routes.len(),
                if c.routes.len() == 1 { "" } else { "s" }
            );
            0
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "{} error{} in {}",
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" },
                path.display()
            );
            EXIT_CONFIG
        }
    }
}
