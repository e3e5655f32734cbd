//! A period's usage by model in [`InMemoryUsageStore`](super::InMemoryUsageStore): totals of the
//! events that named a model or gave token classes, kept as they are recorded; the events that
//! gave neither are the rest of the period's usage, and their row is worked out when asked, so
//! that recording them costs nothing here.

use crate::domain::{BillableTokens, ModelName, UsageRecord};
use crate::store::{ModelUsage, PeriodSummary};

/// The rows of the events that reported a model or token classes, in no order.
#[derive(Debug, Default)]
pub(super) struct ModelTotals(Vec<ModelUsage>);

impl ModelTotals {
    /// Counts an event; one without detail is left to [`report`](Self::report).
    pub(super) fn add(&mut self, usage: &UsageRecord) {
        if usage.detail.is_none() {
            return;
        }
        let model = usage.model();
        match self.0.iter_mut().find(|row| row.model.as_ref() == model) {
            Some(row) => row.add(usage),
            None => {
                let mut row = ModelUsage::new(model.cloned());
                row.add(usage);
                self.0.push(row);
            }
        }
    }

    /// The period's rows, ordered by model (no model first): the events counted here, and the
    /// rest of the period's usage (every token of it billable one for one) under no model.
    /// `all_tokens` are the period's tokens, of every event.
    pub(super) fn report(&self, summary: &PeriodSummary, all_tokens: u64) -> Vec<ModelUsage> {
        let mut rows = self.0.clone();
        let counted_tokens = rows.iter().fold(0u64, |sum, row| sum.saturating_add(row.total_tokens));
        let counted_events = rows.iter().fold(0u64, |sum, row| sum.saturating_add(row.events));
        let plain_events = summary.events.saturating_sub(counted_events);
        if plain_events > 0 {
            let plain_tokens = all_tokens.saturating_sub(counted_tokens);
            let plain = ModelUsage {
                model: None,
                events: plain_events,
                total_tokens: plain_tokens,
                counts: Default::default(),
                billable: BillableTokens::whole(plain_tokens),
            };
            match rows.iter_mut().find(|row| row.model.is_none()) {
                Some(row) => {
                    row.events += plain.events;
                    row.total_tokens = row.total_tokens.saturating_add(plain.total_tokens);
                    row.billable = row.billable.checked_add(plain.billable).unwrap_or(row.billable);
                }
                None => rows.push(plain),
            }
        }
        rows.sort_by(|a, b| {
            a.model
                .as_ref()
                .map(ModelName::as_str)
                .cmp(&b.model.as_ref().map(ModelName::as_str))
        });
        rows
    }
}
