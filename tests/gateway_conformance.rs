//! The gateway conformance suite fails the gateways it must fail: each gateway here wraps the
//! sandbox and breaks one clause of the `PaymentGateway` contract, and the suite must name that
//! clause. The sandbox itself passes every check, and a gateway without subscriptions whose
//! fixture says so has those checks skipped, reported, never passed silently.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use token_billing::testing::gateway::{
    self, Check, Clause, GatewayFixture, SandboxFixture, SuiteReport, Unsupported, Verdict,
};
use token_billing::{
    ChargeKey, CustomerId, GatewayError, Money, PaymentGateway, PaymentOutcome, PaymentRequest, PaymentStatus, Plan,
    PlanId, SandboxGateway, Subscription, UserId,
};

/// How a [`Broken`] gateway breaks the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breach {
    /// Reports succeeded payments as canceled (Known outcomes).
    SucceededAsCanceled,
    /// Makes a new payment on every call, whatever the idempotency key (Idempotency).
    NewPaymentOnReusedKey,
    /// Keys payments by their charge only, so that a later round replays the first (New rounds).
    ReplaysTheFirstRound,
    /// Sends amounts in major units, as if every currency had two decimals (Minor units).
    SendsMajorUnits,
    /// Finds no payment, ever (Look-up by charge key).
    ForgetsPayments,
    /// Cancels succeeded payments, and then no longer finds them (Cancel).
    CancelsSucceededPayments,
    /// Opens a new customer on every call (Customers).
    NewCustomerOnEveryCall,
    /// Answers a customer it never opened (Customers).
    CustomerNeverOpened,
    /// Has no subscriptions: refuses every one (Subscriptions, unless the fixture says so).
    NoSubscriptions,
}

/// The sandbox, with one breach of the contract.
#[derive(Debug)]
struct Broken {
    sandbox: SandboxGateway,
    breach: Breach,
    calls: AtomicU64,
    canceled: Mutex<HashSet<String>>,
}

impl Broken {
    fn new(breach: Breach) -> (Broken, SandboxFixture) {
        let sandbox = SandboxGateway::new();
        let broken = Broken {
            sandbox: sandbox.clone(),
            breach,
            calls: AtomicU64::new(0),
            canceled: Mutex::new(HashSet::new()),
        };
        (broken, SandboxFixture(sandbox))
    }

    fn call(&self) -> u64 {
        self.calls.fetch_add(1, Ordering::Relaxed)
    }

    fn was_canceled(&self, payment_id: &str) -> bool {
        self.canceled.lock().expect("lock").contains(payment_id)
    }
}

#[async_trait]
impl PaymentGateway for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }

    async fn create_customer(&self, user: &UserId) -> Result<CustomerId, GatewayError> {
        if self.breach == Breach::CustomerNeverOpened {
            return Ok(CustomerId::new(format!("cus_unopened_{user}")).expect("valid"));
        }
        if self.breach == Breach::NewCustomerOnEveryCall {
            let user = UserId::new(format!("{user}-{}", self.call())).expect("valid");
            return self.sandbox.create_customer(&user).await;
        }
        self.sandbox.create_customer(user).await
    }

    async fn collect(&self, request: &PaymentRequest<'_>) -> Result<PaymentOutcome, GatewayError> {
        let mut charge = request.charge.clone();
        let key = match self.breach {
            Breach::NewPaymentOnReusedKey => format!("{}:call{}", request.idempotency_key, self.call()),
            Breach::ReplaysTheFirstRound => charge.key.as_str().to_owned(),
            _ => request.idempotency_key.to_owned(),
        };
        if self.breach == Breach::SendsMajorUnits {
            charge.amount = Money::from_minor(charge.amount.minor_units() / 100, charge.amount.currency());
        }
        let mut outcome = self
            .sandbox
            .collect(&PaymentRequest {
                charge: &charge,
                idempotency_key: &key,
                customer: request.customer,
            })
            .await?;
        if self.breach == Breach::SucceededAsCanceled && outcome.status == PaymentStatus::Succeeded {
            outcome.status = PaymentStatus::Canceled;
        }
        Ok(outcome)
    }

    async fn find_payment(&self, charge_key: &ChargeKey) -> Result<Option<PaymentOutcome>, GatewayError> {
        if self.breach == Breach::ForgetsPayments {
            return Ok(None);
        }
        let found = self.sandbox.find_payment(charge_key).await?;
        Ok(found.filter(|outcome| !self.was_canceled(&outcome.payment_id)))
    }

    async fn cancel_payment(&self, payment_id: &str) -> Result<PaymentOutcome, GatewayError> {
        let mut outcome = self.sandbox.cancel_payment(payment_id).await?;
        if self.breach == Breach::CancelsSucceededPayments && outcome.status == PaymentStatus::Succeeded {
            self.canceled.lock().expect("lock").insert(payment_id.to_owned());
            outcome.status = PaymentStatus::Canceled;
        }
        Ok(outcome)
    }

    async fn create_subscription(
        &self,
        user: &UserId,
        customer: &CustomerId,
        plan_id: &PlanId,
        plan: &Plan,
    ) -> Result<Subscription, GatewayError> {
        if self.breach == Breach::NoSubscriptions {
            return Err(GatewayError::Rejected {
                gateway: "broken",
                code: "unsupported".to_owned(),
                message: "no subscriptions here".to_owned(),
            });
        }
        self.sandbox.create_subscription(user, customer, plan_id, plan).await
    }
}

/// The sandbox fixture, saying that the gateway has no subscriptions.
struct WithoutSubscriptions(SandboxFixture);

#[async_trait]
impl GatewayFixture for WithoutSubscriptions {
    async fn paying_customer(&self) -> CustomerId {
        self.0.paying_customer().await
    }
    async fn declining_customer(&self) -> CustomerId {
        self.0.declining_customer().await
    }
    fn decline_code(&self) -> &str {
        self.0.decline_code()
    }
    async fn authenticating_customer(&self) -> CustomerId {
        self.0.authenticating_customer().await
    }
    async fn processing_customer(&self) -> Result<CustomerId, Unsupported> {
        self.0.processing_customer().await
    }
    async fn give_paying_card(&self, customer: &CustomerId) {
        self.0.give_paying_card(customer).await;
    }
    async fn amount_charged(&self, payment_id: &str) -> Option<Money> {
        self.0.amount_charged(payment_id).await
    }
    fn subscriptions(&self) -> Result<(), Unsupported> {
        Err(Unsupported("this gateway collects no fixed fee by subscription"))
    }
    async fn subscriber(&self, _subscription: &Subscription) -> Option<UserId> {
        None
    }
}

/// The suite's report on a gateway with `breach`.
async fn report_on(breach: Breach) -> SuiteReport {
    let (gateway, fixture) = Broken::new(breach);
    gateway::run(&gateway, &fixture).await
}

/// Asserts that `report` fails `check` with a violation of `clause`, and names the clause.
fn assert_fails(report: &SuiteReport, check: Check, clause: Clause) {
    let (_, result) = report
        .results()
        .iter()
        .find(|(c, _)| *c == check)
        .expect("every check is reported");
    let violation = result.as_ref().expect_err(&format!("{check} must fail:\n{report}"));
    assert_eq!(violation.clause, clause, "{violation}");
    assert!(
        violation.to_string().contains(&format!("\"{}\"", clause.name())),
        "the message names the clause: {violation}"
    );
    assert!(report.violated_clauses().contains(&clause), "{report}");
}

#[tokio::test]
async fn the_sandbox_passes_every_check() {
    let sandbox = SandboxGateway::new();
    let report = gateway::run(&sandbox, &SandboxFixture(sandbox.clone())).await;
    report.assert_conforms();
    assert_eq!(report.passed(), Check::ALL, "nothing skipped: {report}");
}

#[tokio::test]
async fn every_check_and_clause_is_exercised_by_the_sandbox() {
    // Every clause has a check, and the suite runs them in the order of Check::ALL.
    for clause in Clause::ALL {
        assert!(
            Check::ALL.iter().any(|check| check.clause() == clause),
            "{clause} has no check"
        );
    }
    let sandbox = SandboxGateway::new();
    let report = gateway::run(&sandbox, &SandboxFixture(sandbox.clone())).await;
    let run: Vec<Check> = report.results().iter().map(|(check, _)| *check).collect();
    assert_eq!(run, Check::ALL);
}

#[tokio::test]
async fn succeeded_payments_reported_as_canceled_fail_known_outcomes() {
    let report = report_on(Breach::SucceededAsCanceled).await;
    assert_fails(&report, Check::SucceededIsReportedSucceeded, Clause::KnownOutcomes);
}

#[tokio::test]
async fn a_second_payment_on_a_reused_key_fails_idempotency() {
    let report = report_on(Breach::NewPaymentOnReusedKey).await;
    assert_fails(&report, Check::ReusedKeyAnswersTheFirstPayment, Clause::Idempotency);
}

#[tokio::test]
async fn replaying_the_first_round_fails_new_rounds() {
    let report = report_on(Breach::ReplaysTheFirstRound).await;
    assert_fails(&report, Check::NewRoundIsANewAttempt, Clause::NewRounds);
}

#[tokio::test]
async fn amounts_in_major_units_fail_minor_units() {
    let report = report_on(Breach::SendsMajorUnits).await;
    assert_fails(&report, Check::AmountsAreInMinorUnits, Clause::MinorUnits);
}

#[tokio::test]
async fn a_look_up_that_forgets_payments_fails_look_up_by_charge_key() {
    let report = report_on(Breach::ForgetsPayments).await;
    for check in [
        Check::FoundAfterTheAnswerWasLost,
        Check::AwaitingCustomerIsFound,
        Check::ProcessingIsFound,
    ] {
        assert_fails(&report, check, Clause::LookupByChargeKey);
    }
}

#[tokio::test]
async fn canceling_a_succeeded_payment_fails_cancel() {
    let report = report_on(Breach::CancelsSucceededPayments).await;
    assert_fails(&report, Check::SucceededPaymentIsNotCanceled, Clause::Cancel);
    // Nothing else is broken, and the report says only that.
    assert_eq!(report.violated_clauses(), [Clause::Cancel], "{report}");
}

#[tokio::test]
#[should_panic(expected = "a_succeeded_payment_is_not_canceled violates the contract clause \"Cancel\"")]
async fn assert_conforms_panics_naming_the_check_and_the_clause() {
    report_on(Breach::CancelsSucceededPayments).await.assert_conforms();
}

#[tokio::test]
async fn a_check_run_alone_panics_in_a_test_naming_its_clause() {
    // What each test of `payment_gateway_conformance!` does: run one check, panic on a violation.
    let task = tokio::spawn(async {
        let (gateway, fixture) = Broken::new(Breach::CancelsSucceededPayments);
        if let Err(violation) = Check::SucceededPaymentIsNotCanceled.run(&gateway, &fixture).await {
            panic!("{violation}");
        }
    });
    let error = task.await.expect_err("the check fails");
    let message = error.into_panic();
    let message = message.downcast_ref::<String>().expect("a formatted panic message");
    assert!(message.contains("the contract clause \"Cancel\""), "{message}");
}

#[tokio::test]
async fn a_new_customer_on_every_call_fails_customers() {
    let report = report_on(Breach::NewCustomerOnEveryCall).await;
    assert_fails(&report, Check::CustomerIsOpenedOncePerUser, Clause::Customers);
}

#[tokio::test]
async fn a_customer_never_opened_fails_customers() {
    let report = report_on(Breach::CustomerNeverOpened).await;
    assert_fails(&report, Check::OpenedCustomerIsAccepted, Clause::Customers);
}

#[tokio::test]
async fn a_gateway_without_subscriptions_fails_unless_its_fixture_says_so() {
    let report = report_on(Breach::NoSubscriptions).await;
    assert_fails(&report, Check::SubscriptionNamesItsUser, Clause::Subscriptions);
    assert_fails(
        &report,
        Check::SubscriptionIsMadeOncePerUserAndPlan,
        Clause::Subscriptions,
    );

    let (gateway, fixture) = Broken::new(Breach::NoSubscriptions);
    let report = gateway::run(&gateway, &WithoutSubscriptions(fixture)).await;
    report.assert_conforms();
    let why = Unsupported("this gateway collects no fixed fee by subscription");
    assert_eq!(
        report.skipped(),
        [
            (Check::SubscriptionNamesItsUser, why),
            (Check::SubscriptionIsMadeOncePerUserAndPlan, why),
        ]
    );
    let (_, verdict) = &report.results()[report.results().len() - 1];
    assert_eq!(verdict, &Ok(Verdict::Skipped(why)));
    assert!(
        report
            .to_string()
            .contains("skipped a_subscription_names_its_customer_plan_and_user"),
        "{report}"
    );
}
