//! Bad input gets a typed error and records nothing.

mod common;

use chrono::Duration;
use common::{Harness, nov15, november, user};
use token_billing::{
    BillingError, IdError, MAX_TOKENS, Metadata, MetadataError, Plan, RatingError, UsageError, UsageReport,
};

fn metadata(entries: impl IntoIterator<Item = (String, String)>) -> Metadata {
    entries.into_iter().collect()
}

/// A bad report: what is wrong with it, the report, and a check of the error it must get.
type BadReport = (&'static str, UsageReport, fn(&BillingError) -> bool);

fn bad_reports() -> Vec<BadReport> {
    let ok = || UsageReport::new("vera", 1_000, "chat");
    vec![
        ("zero tokens", UsageReport::new("vera", 0, "chat"), |e| {
            matches!(e, BillingError::InvalidUsage(UsageError::ZeroTokens))
        }),
        (
            "more than the per-event maximum",
            UsageReport::new("vera", 1_000_000_001, "chat"),
            |e| {
                matches!(
                    e,
                    BillingError::InvalidUsage(UsageError::TooManyTokens {
                        tokens: 1_000_000_001,
                        max: 1_000_000_000
                    })
                )
            },
        ),
        ("empty user id", UsageReport::new("", 1_000, "chat"), |e| {
            matches!(
                e,
                BillingError::InvalidUsage(UsageError::InvalidId(IdError::Empty { kind: "user id" }))
            )
        }),
        (
            "oversized user id",
            UsageReport::new("u".repeat(129), 1_000, "chat"),
            |e| {
                matches!(
                    e,
                    BillingError::InvalidUsage(UsageError::InvalidId(IdError::TooLong { kind: "user id", .. }))
                )
            },
        ),
        ("user id with a space", UsageReport::new("ve ra", 1_000, "chat"), |e| {
            matches!(
                e,
                BillingError::InvalidUsage(UsageError::InvalidId(IdError::BadCharacter {
                    kind: "user id",
                    position: 2
                }))
            )
        }),
        (
            "user id with a control character",
            UsageReport::new("vera\n", 1_000, "chat"),
            |e| {
                matches!(
                    e,
                    BillingError::InvalidUsage(UsageError::InvalidId(IdError::BadCharacter { .. }))
                )
            },
        ),
        ("empty operation type", UsageReport::new("vera", 1_000, ""), |e| {
            matches!(
                e,
                BillingError::InvalidUsage(UsageError::InvalidId(IdError::Empty { kind: "operation type" }))
            )
        }),
        (
            "oversized operation type",
            UsageReport::new("vera", 1_000, "o".repeat(65)),
            |e| {
                matches!(
                    e,
                    BillingError::InvalidUsage(UsageError::InvalidId(IdError::TooLong {
                        kind: "operation type",
                        ..
                    }))
                )
            },
        ),
        ("empty client id", ok().client_id(""), |e| {
            matches!(
                e,
                BillingError::InvalidUsage(UsageError::InvalidId(IdError::Empty { kind: "client id" }))
            )
        }),
        ("oversized client id", ok().client_id("c".repeat(129)), |e| {
            matches!(
                e,
                BillingError::InvalidUsage(UsageError::InvalidId(IdError::TooLong { kind: "client id", .. }))
            )
        }),
        ("oversized event id", ok().event_id("e".repeat(129)), |e| {
            matches!(
                e,
                BillingError::InvalidUsage(UsageError::InvalidId(IdError::TooLong { kind: "event id", .. }))
            )
        }),
        (
            "51 metadata keys",
            ok().metadata(metadata((0..51).map(|i| (format!("k{i}"), "v".into())))),
            |e| {
                matches!(
                    e,
                    BillingError::InvalidUsage(UsageError::Metadata(MetadataError::TooManyKeys { count: 51 }))
                )
            },
        ),
        (
            "a 41-character metadata key",
            ok().metadata_entry("k".repeat(41), "v"),
            |e| {
                matches!(
                    e,
                    BillingError::InvalidUsage(UsageError::Metadata(MetadataError::BadKey { .. }))
                )
            },
        ),
        ("an empty metadata key", ok().metadata_entry("", "v"), |e| {
            matches!(
                e,
                BillingError::InvalidUsage(UsageError::Metadata(MetadataError::BadKey { .. }))
            )
        }),
        ("a metadata key with brackets", ok().metadata_entry("a[b]", "v"), |e| {
            matches!(
                e,
                BillingError::InvalidUsage(UsageError::Metadata(MetadataError::BadKey { .. }))
            )
        }),
        (
            "a 501-character metadata value",
            ok().metadata_entry("k", "é".repeat(501)),
            |e| {
                matches!(
                    e,
                    BillingError::InvalidUsage(UsageError::Metadata(MetadataError::ValueTooLong { chars: 501, .. }))
                )
            },
        ),
        (
            "an event more than 5 minutes in the future",
            ok().occurred_at(nov15() + Duration::seconds(301)),
            |e| matches!(e, BillingError::InvalidUsage(UsageError::InFuture { .. })),
        ),
        (
            "an event after its period's grace window",
            ok().occurred_at(nov15() - Duration::days(60)),
            |e| matches!(e, BillingError::InvalidUsage(UsageError::TooLate { .. })),
        ),
    ]
}

#[tokio::test]
async fn bad_reports_get_typed_errors_and_record_nothing() {
    for (case, report, expected) in bad_reports() {
        let h = Harness::new();
        let error = h.service.process_token_usage(report).await.expect_err(case);
        assert!(expected(&error), "{case}: got {error:?}");
        assert!(error.is_client_error(), "{case}");
        assert!(!error.to_string().is_empty());
        let vera = user("vera");
        assert_eq!(
            h.store.period_summary(&vera, november()).await.expect("summary"),
            None,
            "{case}"
        );
        assert!(
            h.store.audit_trail(&vera, None).await.expect("audit").is_empty(),
            "{case}"
        );
        assert_eq!(h.sandbox.calls(), 0, "{case}: the gateway was not called");
    }
}

#[tokio::test]
async fn limits_are_inclusive() {
    let h = Harness::new();
    let at_limits = UsageReport::new("u".repeat(128), 1_000_000_000, "o".repeat(64))
        .client_id("c".repeat(128))
        .event_id("e".repeat(128))
        .metadata(metadata((0..50).map(|i| (format!("{i:0>40}"), "é".repeat(500)))))
        .occurred_at(nov15() + Duration::seconds(300));
    h.service
        .process_token_usage(at_limits)
        .await
        .expect("every limit is inclusive");
}

#[tokio::test]
async fn late_usage_within_the_grace_window_counts_in_its_own_period() {
    let h = Harness::new();
    // 1 December 01:00 UTC is still 30 November in São Paulo.
    let late_november = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 1, 1, 0, 0).unwrap();
    h.clock.set(late_november + Duration::days(2));
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("vera", 1_000, "chat").occurred_at(late_november))
        .await
        .expect("within the 72-hour grace window");
    assert_eq!(outcome.period, november());
    h.clock.set(late_november + Duration::days(4));
    let error = h
        .service
        .process_token_usage(UsageReport::new("vera", 1_000, "chat").occurred_at(late_november))
        .await
        .expect_err("too late");
    assert!(matches!(error, BillingError::InvalidUsage(UsageError::TooLate { period, .. }) if period == november()));
}

/// The grace window is half-open, as `Plan::late_usage_grace` says: a microsecond before
/// `end + grace` late usage is taken, at exactly `end + grace` it is refused. And an instant is
/// cut to the microsecond before the future check, as `UsageReport::occurred_at` says.
#[tokio::test]
async fn the_grace_window_is_half_open_and_instants_are_cut_to_the_microsecond() {
    let h = Harness::new();
    let november_end = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 1, 3, 0, 0).unwrap();
    let closes = november_end + Duration::hours(72);
    let late = || UsageReport::new("vera", 1_000, "chat").occurred_at(november_end - Duration::hours(1));
    h.clock.set(closes - Duration::microseconds(1));
    let taken = h.service.process_token_usage(late()).await.expect("inside the window");
    assert_eq!(taken.period, november());
    h.clock.set(closes);
    let error = h.service.process_token_usage(late()).await.expect_err("at its end");
    assert!(
        matches!(error, BillingError::InvalidUsage(UsageError::TooLate { accepted_until, .. }) if accepted_until == closes),
        "{error:?}"
    );

    // 999 nanoseconds beyond the skew are cut away; a whole microsecond is not.
    h.clock.set(nov15());
    let skew = Duration::minutes(5);
    h.service
        .process_token_usage(
            UsageReport::new("vera", 1_000, "chat").occurred_at(nov15() + skew + Duration::nanoseconds(999)),
        )
        .await
        .expect("cut to the skew itself");
    let error = h
        .service
        .process_token_usage(
            UsageReport::new("vera", 1_000, "chat").occurred_at(nov15() + skew + Duration::microseconds(1)),
        )
        .await
        .expect_err("beyond the skew");
    assert!(
        matches!(error, BillingError::InvalidUsage(UsageError::InFuture { .. })),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_reused_event_id_with_different_content_is_refused() {
    let h = Harness::new();
    let first = h
        .service
        .process_token_usage(UsageReport::new("vera", 9_000_000, "chat").event_id("evt-9"))
        .await
        .expect("recorded");
    let same = h
        .service
        .process_token_usage(UsageReport::new("vera", 9_000_000, "chat").event_id("evt-9"))
        .await
        .expect("replayed");
    assert!(same.replayed);
    assert_eq!(same.consumption_id, first.consumption_id);
    assert_eq!(same.tier_charges, first.tier_charges, "the original outcome");
    for different in [
        UsageReport::new("vera", 9_000_001, "chat"),
        UsageReport::new("vera", 9_000_000, "embedding"),
        UsageReport::new("vera", 9_000_000, "chat").client_id("c1"),
        UsageReport::new("vera", 9_000_000, "chat").metadata_entry("k", "v"),
        UsageReport::new("vera", 9_000_000, "chat").occurred_at(nov15() - Duration::hours(1)),
    ] {
        let error = h
            .service
            .process_token_usage(different.event_id("evt-9"))
            .await
            .expect_err("conflict");
        assert!(matches!(error, BillingError::EventConflict { .. }), "{error:?}");
    }
    let summary = h.service.token_summary(&user("vera"), None).await.expect("summary");
    assert_eq!(summary.total_tokens, 9_000_000, "nothing else recorded");
    assert_eq!(h.sandbox.payments().len(), 2);
}

#[tokio::test]
async fn totals_that_would_overflow_are_refused() {
    let plan = Plan::builder()
        .included_tokens(0)
        .block_size(MAX_TOKENS / 2)
        .build()
        .expect("valid");
    let h = Harness::with(|b| b.plan(plan).max_tokens_per_event(MAX_TOKENS));
    h.service
        .process_token_usage(UsageReport::new("vera", MAX_TOKENS - 1, "chat"))
        .await
        .expect("recorded");
    let error = h
        .service
        .process_token_usage(UsageReport::new("vera", 2, "chat"))
        .await
        .expect_err("overflow");
    assert!(matches!(error, BillingError::TotalOverflow { total, tokens: 2 } if total == MAX_TOKENS - 1));
    assert!(error.is_client_error());
    let summary = h.service.token_summary(&user("vera"), None).await.expect("summary");
    assert_eq!(summary.total_tokens, MAX_TOKENS - 1);
}

#[tokio::test]
async fn an_event_that_would_start_too_many_blocks_is_refused() {
    let plan = Plan::builder()
        .included_tokens(0)
        .block_size(10)
        .build()
        .expect("valid");
    let h = Harness::with_plan(plan);
    let error = h
        .service
        .process_token_usage(UsageReport::new("vera", 1_000_000, "chat"))
        .await
        .expect_err("100,000 blocks in one event");
    assert!(
        matches!(
            error,
            BillingError::Rating(RatingError::TooManyBlocks { blocks: 100_000 })
        ),
        "{error:?}"
    );
    assert_eq!(
        h.store
            .period_summary(&user("vera"), november())
            .await
            .expect("summary"),
        None
    );
}
