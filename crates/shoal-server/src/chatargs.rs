//! The built-in chat actor's arguments, checked when it is spawned: an unknown flag, a
//! flag without its value, a value of the wrong type or a model the daemon has not loaded
//! is a 400 at spawn time rather than an actor whose first message fails. The flags are
//! those `guests/chat` parses (its `parse`); a flag added there must be added here.

use crate::error::ApiError;

/// What a flag's value must be.
#[derive(Clone, Copy)]
enum Kind {
    Switch,
    Text,
    Float,
    Unsigned32,
    Unsigned64,
    Policy,
}

fn kind(flag: &str) -> Option<Kind> {
    Some(match flag {
        "--model" | "--prompt" => Kind::Text,
        "--temperature" | "--top-p" | "--repeat-penalty" => Kind::Float,
        "--seed" => Kind::Unsigned64,
        "--top-k" | "--max-tokens" | "--context" | "--prompt-tokens" | "--gen" | "--repeat" => Kind::Unsigned32,
        "--context-policy" => Kind::Policy,
        "--stats" | "--bench" => Kind::Switch,
        _ => return None,
    })
}

/// Checks `args`; returns the model they name (the last `--model`), if any. `models` are
/// the names the daemon serves.
pub fn check(args: &[String], models: &[String]) -> Result<Option<String>, ApiError> {
    let shown = |s: &str| crate::error::shown(s, 64);
    let mut model = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(k) = kind(flag) else {
            return Err(ApiError::bad(format!(
                "unknown argument `{}` for the chat actor (it takes --model, --temperature, --seed, --top-k, \
                 --top-p, --repeat-penalty, --max-tokens, --context, --context-policy)",
                shown(flag)
            ))
            .param("args"));
        };
        if matches!(k, Kind::Switch) {
            continue;
        }
        let Some(v) = it.next() else {
            return Err(ApiError::bad(format!("{flag} needs a value")).param("args"));
        };
        let ok = match k {
            Kind::Float => v.parse::<f32>().is_ok_and(f32::is_finite),
            Kind::Unsigned32 => v.parse::<u32>().is_ok(),
            Kind::Unsigned64 => v.parse::<u64>().is_ok(),
            Kind::Policy => v == "error" || v == "truncate",
            Kind::Text | Kind::Switch => true,
        };
        if !ok {
            return Err(ApiError::bad(format!("bad {flag} `{}`", shown(v))).param("args"));
        }
        if flag == "--model" {
            if !models.contains(v) {
                return Err(ApiError::bad(format!(
                    "no model named `{}` on this daemon (it serves {}; GET /v1/models lists them)",
                    shown(v),
                    models.join(", ")
                ))
                .code("model_not_found")
                .param("args"));
            }
            model = Some(v.clone());
        }
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_values_and_models() {
        let m = args(&["smollm2"]);
        assert_eq!(check(&args(&["--model", "smollm2", "--seed", "3"]), &m).unwrap(), Some("smollm2".into()));
        assert_eq!(check(&args(&["--stats", "--context-policy", "truncate"]), &m).unwrap(), None);
        assert!(check(&args(&["--model", "nope"]), &m).is_err());
        assert!(check(&args(&["--temperature", "hot"]), &m).is_err());
        assert!(check(&args(&["--temperature", "NaN"]), &m).is_err());
        assert!(check(&args(&["--max-tokens", "-1"]), &m).is_err());
        assert!(check(&args(&["--seed"]), &m).is_err());
        assert!(check(&args(&["--frobnicate"]), &m).is_err());
        assert!(check(&args(&["--context-policy", "drop"]), &m).is_err());
    }
}
