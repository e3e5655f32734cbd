//! Accounts, the fixed fee in both modes, deferred collection and the audit trail.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, november, user};
use token_billing::{
    AuditEvent, BillingError, BillingService, CardBehaviour, ChargeKind, ChargeStatus, CollectionMode, Currency,
    CustomerId, FeeCollection, GatewayChange, GatewayEvent, InMemoryUsageStore, ManualClock, Money, PaymentOutcome,
    PaymentStatus, PaymentUpdate, PeriodKey, Plan, PlanId, SandboxGateway, UnregisteredUsers, UsageReport, UsageStore,
    UserId,
};

#[tokio::test]
async fn with_a_real_gateway_unregistered_users_wait_until_their_account_exists() {
    let h = Harness::with(|b| b.unregistered_users(UnregisteredUsers::Wait));
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("rui", 9_000_000, "chat"))
        .await
        .expect("usage of an unknown user is still recorded");
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Pending);
    assert_eq!(h.sandbox.calls(), 0, "nobody to charge");
    h.advance(chrono::Duration::hours(1));
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!((report.claimed, report.pending), (2, 2), "they keep waiting");
    assert!(h.sandbox.payments().is_empty());

    let customer = CustomerId::new("cus_rui").expect("valid");
    h.sandbox.add_customer(customer.clone(), CardBehaviour::Succeeds);
    h.advance(chrono::Duration::hours(1));
    h.service
        .register_account(&user("rui"), Some(customer), None)
        .await
        .expect("registered");
    let summary = h.service.token_summary(&user("rui"), None).await.expect("summary");
    assert_eq!(
        (summary.total_charged, summary.outstanding_count),
        (50_000, 0),
        "collected on registration"
    );
    h.assert_period_consistent(&user("rui"), november(), &Plan::default())
        .await;
}

/// A run that finds no customer for a user's charges gives their leases up: the registration
/// that follows at once collects them, not a run after the lease expires.
#[tokio::test]
async fn a_registration_right_after_a_run_collects_the_charges_the_run_could_not() {
    let h = Harness::with(|b| {
        b.unregistered_users(UnregisteredUsers::Wait)
            .collection(CollectionMode::Deferred)
    });
    let rui = user("rui");
    h.service
        .process_token_usage(UsageReport::new("rui", 9_000_000, "chat"))
        .await
        .expect("recorded");
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!((report.claimed, report.pending), (2, 2), "nobody to charge yet");
    // Claimable at once: a second run at the same instant takes them (and ends, giving them up).
    let again = h.service.resume_pending().await.expect("resume");
    assert_eq!((again.claimed, again.pending), (2, 2));
    let customer = CustomerId::new("cus_rui").expect("valid");
    h.sandbox.add_customer(customer.clone(), CardBehaviour::Succeeds);
    h.service
        .register_account(&rui, Some(customer), None)
        .await
        .expect("registered");
    let summary = h.service.token_summary(&rui, None).await.expect("summary");
    assert_eq!(
        (summary.total_charged, summary.outstanding_count),
        (50_000, 0),
        "collected on registration, with no time passed"
    );
    h.assert_period_consistent(&rui, november(), &Plan::default()).await;
}

#[tokio::test]
async fn subscription_mode_records_the_fee_once_when_the_gateway_reports_it_paid() {
    let h = Harness::with(|b| b.fee_collection(FeeCollection::Subscription));
    let sara = user("sara");
    h.register(&sara, CardBehaviour::Succeeds).await;
    let subscription = h.service.create_subscription(&sara).await.expect("subscribed");
    assert_eq!(h.sandbox.subscriptions().len(), 1);
    let again = h.service.create_subscription(&sara).await.expect("idempotent");
    assert_eq!(again.subscription_id, subscription.subscription_id);
    let account = h.store.account(&sara).await.expect("account").expect("registered");
    assert_eq!(
        account.subscription_id.as_deref(),
        Some(subscription.subscription_id.as_str())
    );

    let outcome = h
        .service
        .process_token_usage(UsageReport::new("sara", 9_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.fixed_fee_charge, None, "the subscription collects the fee");
    assert_eq!(outcome.tier_charges.len(), 1);

    // The invoice had a 10% coupon: what it collected is what the summary reports.
    let paid = Money::from_minor(36_000, Currency::BRL);
    // A report in another currency than the plan's does not fit: refused, nothing recorded.
    let dollars = h
        .service
        .record_fixed_fee_paid(
            &sara,
            november(),
            "in_2026_11",
            Money::from_minor(36_000, Currency::USD),
        )
        .await
        .expect_err("refused");
    assert!(matches!(dollars, BillingError::Gateway(_)), "{dollars:?}");
    assert_eq!(
        h.service
            .token_summary(&sara, None)
            .await
            .expect("summary")
            .fixed_fee_charged,
        0
    );
    for _ in 0..3 {
        let fee = h
            .service
            .record_fixed_fee_paid(&sara, november(), "in_2026_11", paid)
            .await
            .expect("recorded");
        assert_eq!((fee.kind, fee.status), (ChargeKind::FixedFee, ChargeStatus::Succeeded));
        assert_eq!((fee.payment_id.as_deref(), fee.amount), (Some("in_2026_11"), paid));
    }
    let summary = h.service.token_summary(&sara, None).await.expect("summary");
    assert_eq!((summary.fixed_fee_charged, summary.total_charged), (36_000, 46_000));
    let fees = h
        .store
        .charges(&sara, november())
        .await
        .expect("charges")
        .into_iter()
        .filter(|c| c.kind == ChargeKind::FixedFee)
        .count();
    assert_eq!(fees, 1);
}

#[tokio::test]
async fn a_library_fee_still_pending_is_marked_paid_not_charged_again() {
    let h = Harness::with(|b| b.collection(CollectionMode::Deferred));
    let tais = user("tais");
    h.register(&tais, CardBehaviour::Succeeds).await;
    h.service
        .process_token_usage(UsageReport::new("tais", 10, "chat"))
        .await
        .expect("recorded");
    let fee = h
        .service
        .record_fixed_fee_paid(&tais, november(), "in_out_of_band", Plan::default().fixed_fee())
        .await
        .expect("paid elsewhere");
    assert_eq!(fee.status, ChargeStatus::Succeeded);
    h.advance(chrono::Duration::hours(1));
    assert_eq!(h.service.resume_pending().await.expect("resume").claimed, 0);
    assert!(h.sandbox.payments().is_empty(), "never charged through the gateway");
}

#[tokio::test]
async fn opening_a_period_charges_the_fee_once_before_any_usage() {
    let h = Harness::new();
    let ugo = user("ugo");
    h.register(&ugo, CardBehaviour::Succeeds).await;
    let first = h
        .service
        .open_period(&ugo, None)
        .await
        .expect("opened")
        .expect("a fee charge");
    assert_eq!(
        (first.status, first.amount.minor_units()),
        (ChargeStatus::Succeeded, 40_000)
    );
    let again = h
        .service
        .open_period(&ugo, None)
        .await
        .expect("opened")
        .expect("a fee charge");
    assert_eq!(again.id, first.id);
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("ugo", 9_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.fixed_fee_charge, None, "the period was already open");
    assert_eq!(h.sandbox.payments().len(), 2);
    h.assert_period_consistent(&ugo, november(), &Plan::default()).await;
}

#[tokio::test]
async fn deferred_collection_records_now_and_collects_on_resume() {
    let h = Harness::with(|b| b.collection(CollectionMode::Deferred));
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("vini", 20_000_000, "chat"))
        .await
        .expect("recorded");
    assert!(outcome.tier_charges.iter().all(|c| c.status == ChargeStatus::Pending));
    assert!(h.sandbox.payments().is_empty());
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!((report.claimed, report.succeeded), (3, 3));
    h.assert_period_consistent(&user("vini"), november(), &Plan::default())
        .await;
}

#[tokio::test]
async fn plans_change_between_periods_not_within_one() {
    let pro = PlanId::new("pro").expect("valid");
    let pro_plan = Plan::builder().included_tokens(20_000_000).build().expect("valid");
    let h = Harness::with(|b| b.add_plan(pro.clone(), pro_plan.clone()));
    let wes = user("wes");
    h.service
        .process_token_usage(UsageReport::new("wes", 9_000_000, "chat"))
        .await
        .expect("recorded");
    let error = h
        .service
        .register_account(&wes, None, Some(pro.clone()))
        .await
        .expect_err("mid-period");
    assert!(matches!(error, BillingError::PlanChangeMidPeriod { .. }), "{error:?}");
    let unknown = h
        .service
        .register_account(&wes, None, Some(PlanId::new("gold").expect("valid")))
        .await
        .expect_err("unknown plan");
    assert!(matches!(unknown, BillingError::UnknownPlan { .. }));

    // December: the change is allowed and the new plan rates the new period.
    h.clock
        .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 10, 12, 0, 0).unwrap());
    h.service
        .register_account(&wes, None, Some(pro))
        .await
        .expect("registered");
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("wes", 19_000_000, "chat"))
        .await
        .expect("recorded");
    assert!(outcome.tier_charges.is_empty(), "20M included on the pro plan");
    assert_eq!(outcome.current_tier, "0-20M");
}

#[tokio::test]
async fn the_audit_trail_records_every_consumption_attempt_and_status_change() {
    let h = Harness::new();
    let xia = user("xia");
    let customer = h
        .register(
            &xia,
            CardBehaviour::Declines {
                code: "card_declined".into(),
            },
        )
        .await;
    h.service
        .process_token_usage(UsageReport::new("xia", 8_000_001, "chat"))
        .await
        .expect("recorded");
    h.sandbox
        .set_behaviour(&customer, CardBehaviour::Succeeds)
        .expect("customer");
    h.advance(chrono::Duration::days(2));
    h.service.retry_failed().await.expect("retry");
    let trail = h.service.audit_trail(&xia, None).await.expect("audit");
    let count = |pred: fn(&AuditEvent) -> bool| trail.iter().filter(|e| pred(&e.event)).count();
    assert_eq!(count(|e| matches!(e, AuditEvent::AccountSaved { .. })), 1);
    assert_eq!(count(|e| matches!(e, AuditEvent::UsageRecorded { .. })), 1);
    assert_eq!(count(|e| matches!(e, AuditEvent::ChargeCreated { .. })), 2);
    assert_eq!(
        count(|e| matches!(e, AuditEvent::CollectionStarted { .. })),
        4,
        "two rounds of two charges"
    );
    // Pending -> Failed, Failed -> Pending (retry), Pending -> Succeeded, for each charge.
    assert_eq!(count(|e| matches!(e, AuditEvent::ChargeStatusChanged { .. })), 6);
    assert!(trail.windows(2).all(|w| w[0].at <= w[1].at), "in order");
}

#[tokio::test]
async fn services_can_be_shared_across_tasks_and_built_over_trait_objects() {
    let store: Arc<dyn UsageStore> = Arc::new(InMemoryUsageStore::new());
    let sandbox = SandboxGateway::new();
    let clock = ManualClock::new(common::nov15());
    let service = BillingService::builder(store, Arc::new(sandbox.clone()))
        .clock(Arc::new(clock))
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                service
                    .process_token_usage(UsageReport::new(format!("user-{i}"), 8_000_001, "chat"))
                    .await
            })
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.await.expect("task").expect("recorded").tier_charges.len(), 1);
    }
    assert_eq!(sandbox.payments().len(), 8);
}

#[tokio::test]
async fn free_plans_settle_zero_amount_charges_without_the_gateway() {
    let free = Plan::builder()
        .fixed_fee(token_billing::Money::zero(token_billing::Currency::BRL))
        .block_price(token_billing::Money::zero(token_billing::Currency::BRL))
        .build()
        .expect("valid");
    let h = Harness::with_plan(free.clone());
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("yara", 20_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.tier_charges.len(), 2);
    assert!(
        outcome
            .tier_charges
            .iter()
            .all(|c| c.status == ChargeStatus::Succeeded && c.amount_charged == 0)
    );
    assert!(h.sandbox.payments().is_empty(), "nothing sent to the gateway");
    let standing = h.service.account_standing(&user("yara")).await.expect("standing");
    assert_eq!(standing.standing, token_billing::Standing::GoodStanding);
    h.assert_period_consistent(&user("yara"), november(), &free).await;
}

#[tokio::test]
async fn a_subscription_is_refused_while_the_library_collects_the_fee() {
    let h = Harness::new();
    let zoe = user("zoe");
    h.register(&zoe, CardBehaviour::Succeeds).await;
    let error = h
        .service
        .create_subscription(&zoe)
        .await
        .expect_err("the fee would be collected twice");
    assert!(matches!(error, BillingError::FeeCollectedByLibrary), "{error:?}");
    assert!(h.sandbox.subscriptions().is_empty());
}

#[tokio::test]
async fn a_second_successful_payment_is_audited_as_a_duplicate_not_absorbed() {
    let h = Harness::with(|b| b.fee_collection(FeeCollection::Subscription));
    let abe = user("abe");
    h.register(&abe, CardBehaviour::Succeeds).await;
    h.service
        .record_fixed_fee_paid(&abe, november(), "in_first", Plan::default().fixed_fee())
        .await
        .expect("recorded");
    let fee = h
        .service
        .record_fixed_fee_paid(&abe, november(), "in_second", Plan::default().fixed_fee())
        .await
        .expect("reported");
    assert_eq!(
        fee.payment_id.as_deref(),
        Some("in_first"),
        "the charge keeps its payment"
    );
    let duplicates: Vec<_> = h
        .service
        .audit_trail(&abe, Some(november()))
        .await
        .expect("audit")
        .into_iter()
        .filter_map(|e| match e.event {
            AuditEvent::DuplicatePayment {
                duplicate_payment_id,
                kept_payment_id,
                ..
            } => Some((kept_payment_id, duplicate_payment_id)),
            _ => None,
        })
        .collect();
    assert_eq!(duplicates, [(Some("in_first".to_owned()), "in_second".to_owned())]);
    let summary = h.service.token_summary(&abe, Some(november())).await.expect("summary");
    assert_eq!(summary.fixed_fee_charged, 40_000, "counted once");
}

/// A harness whose catalogue has a `pro` plan (20M tokens included) beside the default, and
/// `bia`, registered on the default plan.
async fn bia_on_the_default_plan_with_a_pro_plan_beside() -> (Harness, PlanId, UserId) {
    let pro = PlanId::new("pro").expect("valid");
    let h = Harness::with(|b| {
        b.add_plan(
            pro.clone(),
            Plan::builder().included_tokens(20_000_000).build().expect("valid"),
        )
    });
    let bia = user("bia");
    h.register(&bia, CardBehaviour::Succeeds).await;
    (h, pro, bia)
}

/// Bia's 19M tokens in December stay in pro's first tier (20M included), uncharged.
async fn december_is_rated_by_pro(h: &Harness) {
    let december = h
        .service
        .process_token_usage(UsageReport::new("bia", 19_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(
        (december.current_tier.as_str(), december.tier_charges.len()),
        ("0-20M", 0)
    );
}

#[tokio::test]
async fn late_usage_after_a_plan_change_is_rated_under_its_own_periods_plan() {
    let (h, pro, bia) = bia_on_the_default_plan_with_a_pro_plan_beside().await;
    h.service
        .process_token_usage(UsageReport::new("bia", 20_000_000, "chat"))
        .await
        .expect("recorded");
    // 1 December: the user moves to the pro plan.
    let december_first = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 1, 12, 0, 0).unwrap();
    h.clock.set(december_first);
    h.service
        .register_account(&bia, None, Some(pro))
        .await
        .expect("registered");
    // November usage reported late, inside the grace window: November's plan rates it.
    let late = h
        .service
        .process_token_usage(
            UsageReport::new("bia", 5_000_000, "chat").occurred_at(december_first - chrono::Duration::days(2)),
        )
        .await
        .expect("recorded");
    assert_eq!(late.period, november());
    assert_eq!(late.tier_charges.len(), 1, "block 3 of the default plan");
    assert_eq!(late.tier_charges[0].billing_tier, "24M-32M");
    assert_eq!(late.current_tier, "24M-32M");
    let summary = h.service.token_summary(&bia, Some(november())).await.expect("summary");
    assert_eq!(
        (summary.current_tier.as_str(), summary.tier_charges_count),
        ("24M-32M", 3)
    );
    h.assert_period_consistent(&bia, november(), &Plan::default()).await;
    december_is_rated_by_pro(&h).await;
}

#[tokio::test]
async fn an_account_on_a_plan_missing_from_the_catalogue_is_the_services_error() {
    let h = Harness::new();
    let zoe = user("zoe");
    let account = token_billing::Account {
        user_id: zoe.clone(),
        customer_id: None,
        plan_id: PlanId::new("retired").expect("valid"),
        earlier_plans: Vec::new(),
        subscription_id: None,
        limits: None,
        created_at: common::nov15(),
        updated_at: common::nov15(),
    };
    h.store.put_account(account).await.expect("saved");
    let error = h
        .service
        .process_token_usage(UsageReport::new("zoe", 1_000, "chat"))
        .await
        .expect_err("no plan to rate it");
    assert!(
        matches!(&error, BillingError::AccountPlanMissing { user_id, plan_id } if *user_id == zoe && plan_id.as_str() == "retired"),
        "{error:?}"
    );
    assert!(!error.is_client_error(), "the service's configuration, not the request");
    assert!(h.store.consumptions(&zoe, november()).await.expect("read").is_empty());
    let summary = h.service.token_summary(&zoe, None).await.expect_err("no plan");
    assert!(
        matches!(summary, BillingError::AccountPlanMissing { .. }),
        "{summary:?}"
    );
    // Keeping the account's own plan, missing, is the service's error too.
    let kept = h
        .service
        .register_account(&zoe, Some(CustomerId::new("cus_zoe").expect("valid")), None)
        .await
        .expect_err("the account's plan is missing");
    assert!(
        matches!(kept, BillingError::AccountPlanMissing { .. }) && !kept.is_client_error(),
        "{kept:?}"
    );
    // A plan the caller names is still the caller's mistake.
    let unknown = h
        .service
        .register_account(&zoe, None, Some(PlanId::new("gold").expect("valid")))
        .await
        .expect_err("unknown plan");
    assert!(matches!(unknown, BillingError::UnknownPlan { .. }) && unknown.is_client_error());
    // The way out: move the user to a plan of the catalogue; its usage is then recorded.
    h.service
        .register_account(&zoe, None, Some(PlanId::new("default").expect("valid")))
        .await
        .expect("moved off the retired plan");
    h.service
        .process_token_usage(UsageReport::new("zoe", 1_000, "chat"))
        .await
        .expect("rated by the default plan");
}

/// A plan retired from the catalogue after a user left it does not stop the user's usage: only
/// the periods it rated need it.
#[tokio::test]
async fn a_retired_earlier_plan_in_another_zone_does_not_stop_current_usage() {
    let tokyo = PlanId::new("tokyo").expect("valid");
    let tokyo_plan = Plan::builder().zone(chrono_tz::Asia::Tokyo).build().expect("valid");
    let now = at_2026(12, 10, 12);
    let account = token_billing::Account {
        user_id: user("rita"),
        customer_id: None,
        plan_id: tokyo.clone(),
        earlier_plans: vec![(
            PeriodKey::new(2026, 12).expect("valid"),
            PlanId::new("sao-paulo").expect("valid"),
        )],
        subscription_id: None,
        limits: None,
        created_at: now,
        updated_at: now,
    };
    // The catalogue no longer has the São Paulo plan that rated November.
    let h = Harness::with(|b| b.add_plan(tokyo, tokyo_plan));
    h.clock.set(now);
    h.store.put_account(account).await.expect("saved");
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("rita", 1_000, "chat"))
        .await
        .expect("December is rated by the Tokyo plan");
    assert_eq!(outcome.period, PeriodKey::new(2026, 12).expect("valid"));
    let summary = h.service.token_summary(&user("rita"), None).await.expect("summary");
    assert_eq!(summary.total_tokens, 1_000);
}

#[tokio::test]
async fn a_second_plan_change_in_a_period_keeps_the_plan_the_periods_before_had() {
    let (h, pro, bia) = bia_on_the_default_plan_with_a_pro_plan_beside().await;
    h.service
        .process_token_usage(UsageReport::new("bia", 9_000_000, "chat"))
        .await
        .expect("November: 9M on the default plan, one block");
    // December, before any usage: to pro, back to the default plan, and to pro again.
    h.clock
        .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 2, 12, 0, 0).unwrap());
    let default = PlanId::new("default").expect("valid");
    for plan in [pro.clone(), default, pro.clone()] {
        let account = h
            .service
            .register_account(&bia, None, Some(plan))
            .await
            .expect("a change before December's usage");
        assert_eq!(account.plan_for(november()).as_str(), "default");
    }
    let summary = h.service.token_summary(&bia, Some(november())).await.expect("summary");
    assert_eq!(
        (summary.current_tier.as_str(), summary.tier_charges_count),
        ("8M-16M", 1)
    );
    // Late November usage is rated by November's plan: 17M starts the default plan's block 2,
    // where pro (20M included) would charge nothing.
    let late = h
        .service
        .process_token_usage(UsageReport::new("bia", 8_000_000, "chat").occurred_at(common::nov15()))
        .await
        .expect("within November's grace window");
    assert_eq!(late.period, november());
    assert_eq!(late.tier_charges.len(), 1);
    assert_eq!(late.tier_charges[0].billing_tier, "16M-24M");
    h.assert_period_consistent(&bia, november(), &Plan::default()).await;
    december_is_rated_by_pro(&h).await;
}

#[tokio::test]
async fn a_new_customer_keeps_the_accounts_plan_and_a_new_plan_its_customer() {
    let (h, pro, bia) = bia_on_the_default_plan_with_a_pro_plan_beside().await;
    let account = h
        .service
        .register_account(&bia, None, Some(pro))
        .await
        .expect("to pro before any usage");
    let old_customer = account.customer_id.clone().expect("registered with one");
    let new_customer = CustomerId::new("cus_bia_new_card").expect("valid");
    h.sandbox.add_customer(new_customer.clone(), CardBehaviour::Succeeds);
    let account = h
        .service
        .register_account(&bia, Some(new_customer.clone()), None)
        .await
        .expect("a new customer");
    assert_eq!(
        (account.customer_id.as_ref(), account.plan_id.as_str()),
        (Some(&new_customer), "pro")
    );
    assert_ne!(old_customer, new_customer);
    let stored = h.store.account(&bia).await.expect("read").expect("an account");
    assert_eq!(stored.plan_id.as_str(), "pro");
}

#[tokio::test]
async fn a_fee_collected_ahead_of_usage_fixes_the_periods_plan() {
    let (h, pro, bia) = bia_on_the_default_plan_with_a_pro_plan_beside().await;
    // The monthly job opens December for the user before any usage: the default plan's fee.
    h.clock
        .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 1, 12, 0, 0).unwrap());
    let fee = h
        .service
        .open_period(&bia, None)
        .await
        .expect("opened")
        .expect("the library collects the fee");
    assert_eq!(
        (fee.amount.minor_units(), fee.status),
        (40_000, ChargeStatus::Succeeded)
    );
    let error = h
        .service
        .register_account(&bia, None, Some(pro))
        .await
        .expect_err("December's fee was the default plan's");
    assert!(
        matches!(&error, BillingError::PlanChangeMidPeriod { period, .. } if period.to_string() == "2026-12"),
        "{error:?}"
    );
    let account = h.store.account(&bia).await.expect("read").expect("an account");
    assert_eq!((account.plan_id.as_str(), account.earlier_plans.len()), ("default", 0));
}

#[tokio::test]
async fn late_usage_is_taken_for_the_grace_window_of_its_own_periods_plan() {
    // November on the default plan (72 hours of grace); from December, a plan with none or one
    // with ten days: neither changes how long November takes late usage.
    let (strict, lenient) = (
        PlanId::new("strict").expect("valid"),
        PlanId::new("lenient").expect("valid"),
    );
    let h = Harness::with(|b| {
        b.add_plan(
            strict.clone(),
            Plan::builder().late_usage_grace(Duration::ZERO).build().expect("valid"),
        )
        .add_plan(
            lenient.clone(),
            Plan::builder()
                .late_usage_grace(Duration::from_secs(10 * 24 * 3600))
                .build()
                .expect("valid"),
        )
    });
    let (bia, caio) = (user("bia"), user("caio"));
    let late_november = |id: &str| UsageReport::new(id, 1_000, "chat").occurred_at(common::nov15());
    for (who, plan) in [(&bia, &strict), (&caio, &lenient)] {
        h.register(who, CardBehaviour::Succeeds).await;
        h.service
            .process_token_usage(late_november(who.as_str()))
            .await
            .expect("recorded in November");
        h.clock
            .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 1, 12, 0, 0).unwrap());
        h.service
            .register_account(who, None, Some(plan.clone()))
            .await
            .expect("a new plan from December");
        h.clock.set(common::nov15());
    }
    // 2 December: within the default plan's 72 hours after November ended (1 December, 03:00
    // UTC), though the strict plan now rating December has no grace at all.
    h.clock
        .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 2, 12, 0, 0).unwrap());
    let late = h
        .service
        .process_token_usage(late_november("bia"))
        .await
        .expect("taken under November's grace window");
    assert_eq!((late.period, late.total_tokens), (november(), 2_000));
    // 5 December: past the default plan's window, though the lenient plan's would still be open.
    h.clock
        .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 5, 12, 0, 0).unwrap());
    let error = h
        .service
        .process_token_usage(late_november("caio"))
        .await
        .expect_err("November's window has passed");
    assert!(
        matches!(error, BillingError::InvalidUsage(token_billing::UsageError::TooLate { period, .. }) if period == november()),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_resend_in_a_later_period_answers_the_tier_of_its_originals_plan() {
    let (h, pro, bia) = bia_on_the_default_plan_with_a_pro_plan_beside().await;
    // November, on the default plan: 9M tokens are in its second tier, 8M-16M.
    let report = UsageReport::new("bia", 9_000_000, "chat").event_id("evt-nov");
    let original = h.service.process_token_usage(report.clone()).await.expect("recorded");
    assert_eq!(original.current_tier, "8M-16M");
    // December, on the pro plan, whose first tier is 0-20M: the host re-sends the event
    // without `occurred_at`, as it first did, so the re-send is placed in December.
    h.clock
        .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 2, 12, 0, 0).unwrap());
    h.service
        .register_account(&bia, None, Some(pro))
        .await
        .expect("registered");
    let replay = h.service.process_token_usage(report.clone()).await.expect("replayed");
    assert!(replay.replayed);
    assert_eq!(
        (replay.consumption_id, replay.period, replay.current_tier.as_str()),
        (original.consumption_id, november(), "8M-16M")
    );
    assert_eq!(replay.tier_charges, original.tier_charges);
    // The same in a batch.
    let batch = h
        .service
        .process_token_usage_batch(vec![report])
        .await
        .expect("the batch");
    let replay = batch[0].as_ref().expect("replayed");
    assert!(replay.replayed);
    assert_eq!(
        (replay.consumption_id, replay.period, replay.current_tier.as_str()),
        (original.consumption_id, november(), "8M-16M")
    );
}

#[tokio::test]
async fn a_resent_event_is_answered_even_once_it_would_be_refused() {
    let h = Harness::new();
    let report = UsageReport::new("cris", 9_000_000, "chat")
        .event_id("evt-old")
        .occurred_at(common::nov15());
    let original = h.service.process_token_usage(report.clone()).await.expect("recorded");
    // Weeks later the grace window has passed, and another instance has a lower limit.
    h.clock
        .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2027, 1, 20, 12, 0, 0).unwrap());
    let replay = h.service.process_token_usage(report.clone()).await.expect("replayed");
    assert!(replay.replayed);
    assert_eq!(
        (replay.consumption_id, replay.total_tokens),
        (original.consumption_id, 9_000_000)
    );
    let stricter = common::Harness::over(h.store.clone(), Arc::new(h.sandbox.clone()), h.sandbox.clone(), |b| {
        b.max_tokens_per_event(1_000)
    });
    let replay = stricter.service.process_token_usage(report).await.expect("replayed");
    assert_eq!(replay.consumption_id, original.consumption_id);
    // A new event, or different usage under the old id, is still refused.
    let error = h
        .service
        .process_token_usage(
            UsageReport::new("cris", 1, "chat")
                .event_id("evt-new")
                .occurred_at(common::nov15()),
        )
        .await
        .expect_err("too late");
    assert!(matches!(
        error,
        BillingError::InvalidUsage(token_billing::UsageError::TooLate { .. })
    ));
    let error = h
        .service
        .process_token_usage(
            UsageReport::new("cris", 2, "chat")
                .event_id("evt-old")
                .occurred_at(common::nov15()),
        )
        .await
        .expect_err("conflict");
    assert!(matches!(error, BillingError::EventConflict { .. }), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_payment_is_reported_once_however_often_and_concurrently_it_is_delivered() {
    let h = Harness::new();
    let bea = user("bea");
    h.register(&bea, CardBehaviour::Succeeds).await;
    h.service
        .process_token_usage(UsageReport::new("bea", 100, "chat"))
        .await
        .expect("recorded");
    let fee = h.store.charges(&bea, november()).await.expect("charges")[0].clone();
    assert_eq!(fee.status, ChargeStatus::Succeeded);
    let update = PaymentUpdate {
        user_id: bea.clone(),
        charge_key: fee.key.clone(),
        round: Some(0),
        outcome: PaymentOutcome {
            payment_id: "pi_paid_again".to_owned(),
            status: PaymentStatus::Succeeded,
            decline_code: None,
            message: None,
        },
    };
    let event = GatewayEvent {
        id: "evt_dup".to_owned(),
        event_type: "payment_intent.succeeded".to_owned(),
        change: GatewayChange::Payment(update.clone()),
    };
    // The same event delivered eight times at once, and the update applied twice more directly.
    let deliveries = futures_util::future::join_all((0..8).map(|_| h.service.apply_gateway_event(event.clone()))).await;
    assert!(deliveries.iter().all(Result::is_ok));
    for _ in 0..2 {
        h.service.apply_payment_update(update.clone()).await.expect("applied");
    }
    let trail = h.service.audit_trail(&bea, None).await.expect("audit");
    let reports = trail
        .iter()
        .filter(|e| matches!(&e.event, AuditEvent::DuplicatePayment { duplicate_payment_id, .. } if duplicate_payment_id == "pi_paid_again"))
        .count();
    assert_eq!(reports, 1, "one refund to make, reported once");
    let applied = trail
        .iter()
        .filter(|e| matches!(&e.event, AuditEvent::GatewayEventApplied { event_id, .. } if event_id == "evt_dup"))
        .count();
    assert_eq!(applied, 1);
    let charge = h.store.charge(&bea, &fee.key).await.expect("read").expect("the fee");
    assert_eq!(charge.payment_id, fee.payment_id, "the charge keeps its payment");
    let summary = h.service.token_summary(&bea, Some(november())).await.expect("summary");
    assert_eq!(summary.fixed_fee_charged, 40_000, "counted once");
}

/// An hour of a day of 2026, UTC.
fn at_2026(month: u32, day: u32, hour: u32) -> chrono::DateTime<chrono::Utc> {
    chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, month, day, hour, 0, 0)
        .single()
        .expect("valid")
}

/// A period belongs to the plan that rates it: when a user moves from a São Paulo plan to a
/// Tokyo one on 1 December, November ends at midnight in São Paulo and December starts there.
/// Late November usage (17:00 on 30 November in São Paulo, already 1 December in Tokyo) is
/// November's, rated by November's plan; December ends at midnight in Tokyo.
#[tokio::test]
async fn late_usage_after_a_move_to_a_plan_in_another_zone_is_placed_by_its_own_periods_plan() {
    let tokyo = PlanId::new("tokyo").expect("valid");
    let h = Harness::with(|b| {
        b.add_plan(
            tokyo.clone(),
            Plan::builder()
                .included_tokens(20_000_000)
                .zone(chrono_tz::Asia::Tokyo)
                .build()
                .expect("valid"),
        )
    });
    let ivo = user("ivo");
    h.register(&ivo, CardBehaviour::Succeeds).await;
    h.service
        .process_token_usage(UsageReport::new("ivo", 9_000_000, "chat"))
        .await
        .expect("recorded");
    h.clock.set(at_2026(12, 1, 12));
    h.service
        .register_account(&ivo, None, Some(tokyo))
        .await
        .expect("moved to the Tokyo plan between periods");

    let late = h
        .service
        .process_token_usage(UsageReport::new("ivo", 8_000_000, "chat").occurred_at(at_2026(11, 30, 20)))
        .await
        .expect("taken in November's grace window");
    assert_eq!(late.period, november(), "17:00 on 30 November in São Paulo");
    assert_eq!(
        (late.current_tier.as_str(), late.tier_charges.len()),
        ("16M-24M", 1),
        "rated by November's plan: its block 2"
    );
    // Between midnight in Tokyo and midnight in São Paulo: still November.
    let overlap = h
        .service
        .process_token_usage(UsageReport::new("ivo", 1_000, "chat").occurred_at(at_2026(11, 30, 16)))
        .await
        .expect("recorded");
    assert_eq!(overlap.period, november());
    // From midnight in São Paulo: December, under the Tokyo plan.
    let december = PeriodKey::new(2026, 12).expect("valid");
    let first = h
        .service
        .process_token_usage(UsageReport::new("ivo", 19_000_000, "chat").occurred_at(at_2026(12, 1, 3)))
        .await
        .expect("recorded");
    assert_eq!((first.period, first.current_tier.as_str()), (december, "0-20M"));
    let summary = h.service.token_summary(&ivo, None).await.expect("summary");
    assert_eq!((summary.period, summary.total_tokens), (december, 19_000_000));
    // December as the service draws it: from midnight in São Paulo to midnight in Tokyo.
    let bounds = h.service.period(&ivo, Some(december)).await.expect("bounds");
    assert_eq!((bounds.start(), bounds.end()), (at_2026(12, 1, 3), at_2026(12, 31, 15)));
    let current = h.service.period(&ivo, None).await.expect("the current period");
    assert_eq!(current, bounds);
    // December ends at midnight in Tokyo: 1 January 01:00 there is January's.
    h.clock.set(at_2026(12, 31, 16));
    let january = h
        .service
        .process_token_usage(UsageReport::new("ivo", 1_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(january.period, PeriodKey::new(2027, 1).expect("valid"));
    h.assert_period_consistent(&ivo, november(), &Plan::default()).await;
}

/// The other way round: from a Tokyo plan to a São Paulo one. November ends at midnight in
/// Tokyo, so 13:00 on 30 November in São Paulo (1 December in Tokyo) is December's, and no
/// instant falls between the two periods.
#[tokio::test]
async fn usage_after_a_move_from_a_plan_further_east_starts_the_next_period_where_the_last_ended() {
    let tokyo = PlanId::new("tokyo").expect("valid");
    let default = PlanId::new("default").expect("valid");
    let h = Harness::with(|b| {
        b.add_plan(
            tokyo.clone(),
            Plan::builder().zone(chrono_tz::Asia::Tokyo).build().expect("valid"),
        )
    });
    let eva = user("eva");
    h.register(&eva, CardBehaviour::Succeeds).await;
    h.service
        .register_account(&eva, None, Some(tokyo))
        .await
        .expect("on the Tokyo plan before any usage");
    h.service
        .process_token_usage(UsageReport::new("eva", 1_000, "chat"))
        .await
        .expect("recorded");
    h.clock.set(at_2026(12, 1, 12));
    h.service
        .register_account(&eva, None, Some(default))
        .await
        .expect("moved to the São Paulo plan between periods");
    let december = PeriodKey::new(2026, 12).expect("valid");
    for (hour, period) in [(14, november()), (15, december), (16, december)] {
        let outcome = h
            .service
            .process_token_usage(UsageReport::new("eva", 1_000, "chat").occurred_at(at_2026(11, 30, hour)))
            .await
            .expect("recorded");
        assert_eq!(outcome.period, period, "30 November {hour}:00 UTC");
    }
}

/// The review's two cases: a re-send with other usage later in the batch is a conflict, as a
/// single call answers it, not too late; and a replay within the batch shows the original's
/// charges as collected.
#[tokio::test]
async fn a_batch_answers_re_sends_of_its_own_events_as_single_calls_would() {
    let h = Harness::new();
    let september = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 9, 1, 12, 0, 0).unwrap();
    let answers = h
        .service
        .process_token_usage_batch(vec![
            UsageReport::new("ada", 100, "chat").event_id("dup"),
            UsageReport::new("ada", 100, "chat")
                .event_id("dup")
                .occurred_at(september),
            UsageReport::new("ada", 9_000_000, "chat").event_id("big"),
            UsageReport::new("ada", 9_000_000, "chat").event_id("big"),
        ])
        .await
        .expect("the batch");
    assert!(
        matches!(&answers[1], Err(BillingError::EventConflict { event_id }) if event_id.as_str() == "dup"),
        "{:?}",
        answers[1]
    );
    let (original, replay) = (
        answers[2].as_ref().expect("recorded"),
        answers[3].as_ref().expect("replayed"),
    );
    assert!(replay.replayed);
    assert_eq!(replay.tier_charges, original.tier_charges);
    assert_eq!(replay.tier_charges[0].status, ChargeStatus::Succeeded);
}

/// A zero recheck delay is taken as the shortest one (a second): a run that rechecks a payment
/// awaiting the customer ends, rather than claiming it again for ever.
#[test]
fn a_run_ends_whatever_the_recheck_delay() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let h = Harness::with(|b| b.processing_recheck(Duration::ZERO));
            let una = user("una");
            h.register(&una, CardBehaviour::RequiresAuthentication).await;
            h.service
                .process_token_usage(UsageReport::new("una", 100, "chat"))
                .await
                .expect("recorded");
            h.advance(chrono::Duration::hours(1));
            let report = h.service.resume_pending().await.expect("resume");
            let _ = done.send(report.claimed);
        });
    });
    let claimed = finished
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the run ends");
    assert_eq!(claimed, 1, "the fee awaiting the customer, looked at once");
}

/// A customer id the gateway does not have, named to start the fee, fails one charge at most:
/// the user's other waiting charges are not collected with it, and keep waiting.
#[tokio::test]
async fn a_customer_the_gateway_does_not_have_fails_one_waiting_charge_at_most() {
    let h = Harness::with(|b| b.unregistered_users(UnregisteredUsers::Wait));
    let vic = user("vic");
    h.service
        .process_token_usage(UsageReport::new("vic", 17_000_000, "chat"))
        .await
        .expect("recorded: the fee and two blocks wait for a customer");
    let refused = h
        .service
        .open_period_for_customer(&vic, CustomerId::new("cus_typo").expect("valid"))
        .await
        .expect_err("the sandbox does not have the customer");
    assert!(
        matches!(
            refused,
            BillingError::Gateway(token_billing::GatewayError::Rejected { .. })
        ),
        "{refused:?}"
    );
    assert_eq!(
        h.store.account(&vic).await.expect("read").and_then(|a| a.customer_id),
        None,
        "nothing registered"
    );
    let statuses: Vec<_> = h
        .store
        .charges(&vic, november())
        .await
        .expect("charges")
        .iter()
        .map(|c| c.status)
        .collect();
    let failed = statuses.iter().filter(|s| **s == ChargeStatus::Failed).count();
    let waiting = statuses.iter().filter(|s| **s == ChargeStatus::Pending).count();
    assert_eq!((failed, waiting), (1, 2), "{statuses:?}");
    // The right customer then collects everything.
    h.register(&vic, CardBehaviour::Succeeds).await;
    h.service.retry_unpaid(&vic).await.expect("retried");
    let summary = h.service.token_summary(&vic, None).await.expect("summary");
    assert_eq!((summary.total_charged, summary.outstanding_count), (60_000, 0));
}
