//! Test support (feature `testing`): the conformance suites every [`UsageStore`] and
//! [`PaymentGateway`] implementation must pass, and wrappers that inject
//! faults into any store or gateway.
//!
//! The suites are plain async functions over `&dyn UsageStore` / `&dyn PaymentGateway`, so an
//! implementation runs them from its own tests, with any runtime; [`gateway::run`] runs the
//! gateway suite at once and reports every check's verdict, naming the contract clause of each
//! violation. The macros
//! [`usage_store_conformance!`](crate::usage_store_conformance) and
//! [`payment_gateway_conformance!`](crate::payment_gateway_conformance) expand one named
//! `#[tokio::test]` per check (the calling crate needs `tokio` with the `macros` and
//! `rt-multi-thread` features).
//!
//! ```
//! # #[cfg(any())] {
//! // tests/conformance.rs of a crate with its own store:
//! token_billing::usage_store_conformance!(my_store, async { MyStore::connect().await });
//! # }
//! ```

pub mod faults;
pub mod gateway;
pub mod store;

use std::sync::Arc;

use crate::gateway::PaymentGateway;
use crate::store::UsageStore;

/// Views a store as `&dyn UsageStore`, whether it is a concrete value, a `Box<dyn>` or an
/// `Arc<dyn>`: the conformance macros use it so one macro serves all three.
pub trait AsDynStore {
    /// The store as a trait object.
    fn as_dyn_store(&self) -> &dyn UsageStore;
}

impl<T: UsageStore> AsDynStore for T {
    fn as_dyn_store(&self) -> &dyn UsageStore {
        self
    }
}

impl AsDynStore for Box<dyn UsageStore> {
    fn as_dyn_store(&self) -> &dyn UsageStore {
        &**self
    }
}

impl AsDynStore for Arc<dyn UsageStore> {
    fn as_dyn_store(&self) -> &dyn UsageStore {
        &**self
    }
}

/// Views a gateway as `&dyn PaymentGateway`, like [`AsDynStore`].
pub trait AsDynGateway {
    /// The gateway as a trait object.
    fn as_dyn_gateway(&self) -> &dyn PaymentGateway;
}

impl<T: PaymentGateway> AsDynGateway for T {
    fn as_dyn_gateway(&self) -> &dyn PaymentGateway {
        self
    }
}

impl AsDynGateway for Box<dyn PaymentGateway> {
    fn as_dyn_gateway(&self) -> &dyn PaymentGateway {
        &**self
    }
}

impl AsDynGateway for Arc<dyn PaymentGateway> {
    fn as_dyn_gateway(&self) -> &dyn PaymentGateway {
        &**self
    }
}

/// Expands one `#[tokio::test]` per check of the [`UsageStore`] conformance suite, in a module
/// named `$name`, each on a store made by the async block `$make` (a concrete store, a
/// `Box<dyn UsageStore>` or an `Arc<dyn UsageStore>`).
#[macro_export]
macro_rules! usage_store_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::testing::AsDynStore as _;

            $crate::usage_store_conformance!(@tests $make;
                account_round_trips,
                replace_account_is_a_compare_and_set,
                concurrent_account_replacements_lose_no_change,
                record_creates_usage_charges_and_summary,
                record_is_idempotent_by_event_id,
                record_usage_batch_is_record_usage_in_order,
                place_and_record_places_with_the_stored_account,
                accounts_answer_each_user_in_order,
                events_without_a_host_id_are_all_counted,
                event_id_conflict_changes_nothing,
                event_ids_are_scoped_per_user,
                overflow_changes_nothing,
                too_many_blocks_changes_nothing,
                concurrent_records_cross_disjoint_blocks,
                periods_are_separate,
                existing_fee_charge_is_not_created_again,
                ensure_charge_is_idempotent,
                settle_is_a_compare_and_set,
                summary_agrees_with_charges,
                claim_pending_hands_each_charge_to_one_caller,
                claim_due_retries_starts_a_new_round,
                claim_awaiting_customer_rechecks_expired_leases,
                renew_lease_is_a_compare_and_set,
                instants_finer_than_a_microsecond_compare_as_sent,
                recorded_events_are_found_by_id,
                concurrent_resends_record_once,
                resends_in_later_periods_are_not_recorded_again,
                audit_entries_can_be_appended,
                gateway_events_are_recorded_once,
                reports_group_by_operation_and_tier,
                reads_are_isolated_per_user,
                audit_trail_records_every_change,
                concurrent_holds_never_pass_the_ceiling,
                expired_holds_stop_counting,
                reserves_are_idempotent_by_hold_id,
                recording_frees_the_hold_of_its_id,
                the_payment_gate_lets_no_hold_start_a_block,
                each_crossed_threshold_creates_one_alert,
                alerts_are_pending_until_acknowledged,
                billable_totals_are_exact_sums_rounded_up,
                concurrent_fractions_sum_exactly,
                usage_by_model_counts_every_event_once,
            );
        }
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let store = $make.await;
                $crate::testing::store::$test(store.as_dyn_store()).await;
            }
        )*
    };
}

/// Expands one `#[tokio::test]` per check of the [`PaymentGateway`] conformance suite (each of
/// [`Check::ALL`](gateway::Check::ALL), named as [`Check::name`](gateway::Check::name)), in a
/// module named `$name`: `$make` is an async block giving `(gateway, fixture)`, where the
/// gateway is a concrete gateway, a `Box<dyn PaymentGateway>` or an `Arc<dyn PaymentGateway>`
/// and the fixture a [`GatewayFixture`](gateway::GatewayFixture). A check that finds a clause
/// broken panics with its [`Violation`](gateway::Violation), which names the clause; a check
/// the fixture cannot support passes and prints why it was skipped. To get every verdict at
/// once instead, call [`gateway::run`].
///
/// ```
/// # #[cfg(any())] {
/// // tests/conformance.rs of a crate with its own gateway:
/// token_billing::payment_gateway_conformance!(my_gateway, async {
///     let gateway = MyGateway::connect().await;
///     (gateway.clone(), MyFixture(gateway))
/// });
/// # }
/// ```
#[macro_export]
macro_rules! payment_gateway_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::testing::AsDynGateway as _;

            $crate::payment_gateway_conformance!(@tests $make;
                a_success_is_reported_succeeded => SucceededIsReportedSucceeded,
                a_decline_is_reported_with_its_code => DeclineIsReportedWithItsCode,
                authentication_is_reported_as_requires_action => AuthenticationIsReportedRequiresAction,
                a_processing_payment_is_reported_processing => ProcessingIsReportedProcessing,
                an_unknown_customer_is_refused_and_pays_nothing => UnknownCustomerIsRefused,
                amounts_are_charged_in_minor_units => AmountsAreInMinorUnits,
                a_reused_key_answers_the_first_payment => ReusedKeyAnswersTheFirstPayment,
                a_new_round_is_a_new_attempt => NewRoundIsANewAttempt,
                a_charge_never_collected_has_no_payment => NeverCollectedHasNoPayment,
                a_payment_is_found_after_its_answer_was_lost => FoundAfterTheAnswerWasLost,
                a_payment_awaiting_the_customer_is_found => AwaitingCustomerIsFound,
                a_processing_payment_is_found => ProcessingIsFound,
                a_declined_charge_has_no_payment_to_keep => DeclinedHasNoPaymentToKeep,
                a_success_is_found_before_a_payment_in_flight => SuccessIsFoundBeforeOneInFlight,
                a_payment_awaiting_the_customer_is_canceled => AwaitingCustomerIsCanceled,
                a_processing_payment_is_canceled_or_reported_processing => ProcessingIsCanceledOrReported,
                a_succeeded_payment_is_not_canceled => SucceededPaymentIsNotCanceled,
                an_unknown_payment_is_refused => UnknownPaymentIsRefused,
                an_opened_customer_is_accepted => OpenedCustomerIsAccepted,
                a_customer_is_opened_once_per_user => CustomerIsOpenedOncePerUser,
                a_subscription_names_its_customer_plan_and_user => SubscriptionNamesItsUser,
                a_subscription_is_made_once_per_user_and_plan => SubscriptionIsMadeOncePerUserAndPlan,
            );
        }
    };
    (@tests $make:expr; $($test:ident => $check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let check = $crate::testing::gateway::Check::$check;
                assert_eq!(check.name(), stringify!($test), "the test is named after its check");
                let (gateway, fixture) = $make.await;
                match check.run(gateway.as_dyn_gateway(), &fixture).await {
                    Ok($crate::testing::gateway::Verdict::Passed) => {}
                    Ok($crate::testing::gateway::Verdict::Skipped(why)) => {
                        println!("skipped {}: {why}", check.name());
                    }
                    Err(violation) => panic!("{violation}"),
                }
            }
        )*

        /// Every check of the suite has its test here.
        #[test]
        fn every_check_has_a_test() {
            let listed = [$($crate::testing::gateway::Check::$check),*];
            assert_eq!(listed, $crate::testing::gateway::Check::ALL);
        }
    };
}
