//! A simulated month of token billing on the embedded defaults: the original product's plan, the in-memory
//! store and the sandbox gateway. Run it with `cargo run --example quickstart`.
//!
//! With `DATABASE_URL=sqlite://billing.db cargo run --features sqlite --example quickstart` the month
//! is kept in a SQLite file. Run it twice: the second run's events are answered as recorded by
//! the first (each has its own event id), so nothing is counted or charged again.
//!
//! Five users report usage through November 2026. One of them has a card that is declined
//! until she updates it, so the month also shows dunning and the retry after a card update. A
//! sixth streams her completions under a spend cap: each call holds its estimate first
//! (`reserve`), is settled with what it really used, and is refused once the cap is reached.
//! At the end: a statement per user and the sandbox's payment ledger, which shows that every
//! block was paid exactly once.

use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use token_billing::{
    BillingError, BillingService, CardBehaviour, ChargeStatus, CustomerId, InMemoryUsageStore, Limits, ManualClock,
    Money, PeriodKey, Reservation, SandboxGateway, Standing, TierCharge, UnregisteredUsers, UsageReport, UsageStore,
    UserId,
};

/// Who uses how much: tokens per active day, and on how many days out of ten.
const USERS: [(&str, u64, u64); 5] = [
    ("ana", 150_000, 6),          // light: stays inside the allowance
    ("bruno", 1_400_000, 9),      // heavy: several blocks
    ("carla", 700_000, 7),        // crosses into the first block late in the month
    ("test-user-id", 900_000, 4), // the original product's own test user
    ("dora", 1_100_000, 8),       // card declined until she updates it
];

fn brl(minor: i64) -> String {
    format!("R$ {}", Money::from_minor(minor, token_billing::Currency::BRL).amount())
}

fn describe(charge: &TierCharge) -> String {
    format!(
        "{} {} {}",
        charge.billing_tier,
        brl(charge.amount_charged),
        charge.status
    )
}

/// The store: a SQLite file when `DATABASE_URL` names one (`sqlite://billing.db`), else the
/// in-memory store.
async fn store() -> Result<(Arc<dyn UsageStore>, String), Box<dyn std::error::Error>> {
    match std::env::var("DATABASE_URL") {
        #[cfg(feature = "sqlite")]
        Ok(url) if url.starts_with("sqlite:") => Ok((
            Arc::new(token_billing::SqliteUsageStore::connect(&url).await?),
            format!("the SQLite file {url}"),
        )),
        #[cfg(not(feature = "sqlite"))]
        Ok(url) if url.starts_with("sqlite:") => Err("DATABASE_URL names a SQLite file: add --features sqlite".into()),
        // A PostgreSQL URL, say, is another program's: the quickstart stays in memory.
        Ok(url) if !url.is_empty() => Ok((
            Arc::new(InMemoryUsageStore::new()),
            "the in-memory store (DATABASE_URL does not name a SQLite file)".to_owned(),
        )),
        _ => Ok((Arc::new(InMemoryUsageStore::new()), "the in-memory store".to_owned())),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The embedded default (`BillingService::embedded()`), with a clock we can move through the month.
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).single().ok_or("bad date")?);
    let sandbox = SandboxGateway::new();
    let (store, store_name) = store().await?;
    println!("Usage and charges are kept in {store_name}.");
    let billing = BillingService::builder(store, Arc::new(sandbox.clone()))
        .clock(Arc::new(clock.clone()))
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    let plan = billing.default_plan();
    println!(
        "Plan: {} a month covering {} tokens, then {} per started block of {} tokens ({}).\n",
        brl(plan.fixed_fee().minor_units()),
        plan.included_tokens(),
        brl(plan.block_price().minor_units()),
        plan.block_size(),
        plan.zone()
    );

    // Dora's card is declined until she replaces it on the 12th.
    let dora = UserId::new("dora")?;
    let dora_card = CustomerId::new("cus_dora")?;
    sandbox.add_customer(
        dora_card.clone(),
        CardBehaviour::Declines {
            code: "insufficient_funds".into(),
        },
    );
    billing.register_account(&dora, Some(dora_card.clone()), None).await?;

    // Eva may spend at most R$ 600.00 a month: the fee and two blocks, 24M tokens.
    let eva = UserId::new("eva")?;
    let cap = Money::from_minor(60_000, token_billing::Currency::BRL);
    billing
        .set_limits(&eva, Some(Limits::none().with_spend_cap(cap)))
        .await?;

    let mut eva_capped = false;
    let mut seed: u64 = 42;
    let mut random = move |below: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % below
    };
    for day in 1..=30 {
        if day == 12 {
            sandbox.set_behaviour(&dora_card, CardBehaviour::Succeeds)?;
            let retried = billing.retry_unpaid(&dora).await?;
            println!(
                "2026-11-12  dora updates her card: {} unpaid charge(s) retried, {} succeeded",
                retried.claimed, retried.succeeded
            );
        }
        for (name, per_day, active) in USERS {
            if random(10) >= active {
                continue;
            }
            let tokens = per_day / 2 + random(per_day);
            let operation = match random(4) {
                0 => "api_call",
                1 => "embedding",
                _ => "chat",
            };
            let report = UsageReport::new(name, tokens, operation)
                .client_id("quickstart")
                .metadata_entry("conversationId", format!("conv-{day}-{name}"))
                .event_id(format!("{name}-2026-11-{day:02}"));
            let outcome = billing.process_token_usage(report).await?;
            let mut charges: Vec<String> = outcome
                .fixed_fee_charge
                .iter()
                .map(|c| format!("fee {}", describe(c)))
                .collect();
            charges.extend(outcome.tier_charges.iter().map(describe));
            if outcome.replayed {
                charges.push("(recorded by an earlier run)".to_owned());
            }
            let line = format!(
                "2026-11-{day:02}  {name:<12} {operation:<9} {tokens:>9} tokens  total {:>10}  tier {:<8} {}",
                outcome.total_tokens,
                outcome.current_tier,
                charges.join(", ")
            );
            println!("{}", line.trim_end());
        }
        // Eva's streamed completion: its size is known at its end, so it holds an estimate first.
        if !eva_capped {
            let call = format!("eva-2026-11-{day:02}");
            // Drawn before the call, so that a second run on the same file draws the same month.
            let used = 1_000_000 + random(1_200_000);
            match billing
                .reserve(Reservation::new("eva", 2_000_000).hold_id(call.as_str()))
                .await
            {
                Ok(hold) => {
                    let settled = billing
                        .settle_hold(&call, UsageReport::new("eva", used, "chat"))
                        .await?;
                    println!(
                        "2026-11-{day:02}  {:<12} {:<9} {used:>9} tokens  total {:>10}  held {} then settled",
                        "eva", "stream", settled.outcome.total_tokens, hold.granted_tokens
                    );
                }
                Err(BillingError::LimitExceeded {
                    limit,
                    remaining_tokens,
                }) => {
                    println!(
                        "2026-11-{day:02}  {:<12} {:<9} refused: {limit} allows {remaining_tokens} more tokens; no more calls this month",
                        "eva", "stream"
                    );
                    eva_capped = true;
                }
                // The call was settled by an earlier run on the same file.
                Err(BillingError::EventConflict { .. }) => {
                    println!(
                        "2026-11-{day:02}  {:<12} {:<9} recorded by an earlier run",
                        "eva", "stream"
                    );
                }
                Err(error) => return Err(error.into()),
            }
        }

        // The host's hourly jobs, run once a day here.
        let retried = billing.retry_failed().await?;
        if retried.claimed > 0 {
            println!(
                "2026-11-{day:02}  dunning: retried {} charge(s), {} succeeded, {} failed",
                retried.claimed, retried.succeeded, retried.failed
            );
        }
        billing.resume_pending().await?;
        clock.advance(Duration::days(1));
    }

    let november = PeriodKey::new(2026, 11)?;
    println!("\nStatements for {november}:");
    println!(
        "{:<12} {:>11} {:<9} {:>12} {:>7} {:>13} {:>12} {:>12}  standing",
        "user", "tokens", "tier", "fixed fee", "blocks", "block total", "total", "outstanding"
    );
    for name in USERS.iter().map(|(name, _, _)| *name).chain(["eva"]) {
        let user = UserId::new(name)?;
        let summary = billing.token_summary(&user, Some(november)).await?;
        let standing = billing.account_standing(&user).await?;
        println!(
            "{:<12} {:>11} {:<9} {:>12} {:>7} {:>13} {:>12} {:>12}  {}",
            name,
            summary.total_tokens,
            summary.current_tier,
            brl(summary.fixed_fee_charged),
            summary.tier_charges_count,
            brl(summary.tier_charges_total),
            brl(summary.total_charged),
            brl(summary.outstanding_total),
            match standing.standing {
                Standing::GoodStanding => "good",
                Standing::PastDue => "past due",
            }
        );
    }

    println!("\nSandbox ledger:");
    let payments = sandbox.payments();
    for payment in &payments {
        println!(
            "{:<14} {:<44} {:>12}  {:?}{}",
            payment.payment_id,
            payment.idempotency_key,
            brl(payment.amount.minor_units()),
            payment.status,
            payment
                .decline_code
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        );
    }
    let mut paid: Vec<_> = payments
        .iter()
        .filter(|p| p.status == token_billing::PaymentStatus::Succeeded)
        .map(|p| p.charge_key.clone())
        .collect();
    let succeeded = paid.len();
    paid.sort();
    paid.dedup();
    println!(
        "\n{} payments, {succeeded} succeeded, for {} distinct charges: {}",
        payments.len(),
        paid.len(),
        if paid.len() == succeeded {
            "nobody paid twice"
        } else {
            "A CHARGE WAS PAID TWICE"
        }
    );
    for (name, _, _) in USERS {
        let user = UserId::new(name)?;
        let unpaid = billing
            .charges(&user, Some(november))
            .await?
            .iter()
            .filter(|c| c.status != ChargeStatus::Succeeded)
            .count();
        if unpaid > 0 {
            println!("{name}: {unpaid} charge(s) not collected yet");
        }
    }
    Ok(())
}
