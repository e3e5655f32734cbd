//! The plan catalogue, read from the file `TOKEN_BILLING_PLANS` names: TOML, or JSON when the
//! name ends in `.json`, in the library's own serialised form of plans (rate cards included),
//! each under its id. The plan `default` rates the users without an account; without a file,
//! the catalogue is the original product's plan alone. `examples/plans.toml` is an example.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use token_billing::{Plan, PlanId};

/// A catalogue file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalogue {
    plans: BTreeMap<PlanId, Plan>,
}

/// The plans of the catalogue file at `path`, each checked as the library checks a plan.
pub(crate) fn read(path: &Path) -> Result<Vec<(PlanId, Plan)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("TOKEN_BILLING_PLANS: cannot read {}: {e}", path.display()))?;
    let catalogue: Catalogue = if path.extension().is_some_and(|ext| ext == "json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        toml::from_str(&text).map_err(|e| e.to_string())
    }
    .map_err(|e| format!("TOKEN_BILLING_PLANS: {} is not a plan catalogue: {e}", path.display()))?;
    if catalogue.plans.is_empty() {
        return Err(format!("TOKEN_BILLING_PLANS: {} names no plan", path.display()));
    }
    Ok(catalogue.plans.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example catalogue reads, and its cards price what it says.
    #[test]
    fn the_example_catalogue_reads() {
        let plans = read(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/plans.toml"))).expect("reads");
        let ids: Vec<&str> = plans.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["default", "pro"]);
        let pro = &plans[1].1;
        let card = pro.rate_card("2026-12".parse().expect("a period")).expect("a card");
        let model = token_billing::ModelName::new("claude-sonnet-4-5").expect("a model");
        assert_eq!(card.weights_for(Some(&model)).cached_input.to_string(), "0.1");
    }
}
