//! The [`PaymentGateway`] conformance suite: one check or more for every clause of the trait's
//! `# Contract`, each check in the file of the clause it checks.
//!
//! | clauses ([`Clause`]) | file | what it calls |
//! |---|---|---|
//! | Known outcomes, Nothing collected on refusal, Minor units | `collect.rs` | `collect` |
//! | Idempotency, New rounds | `idempotency.rs` | `collect` with a key used or new |
//! | Look-up by charge key | `lookup.rs` | `find_payment` |
//! | Cancel | `cancel.rs` | `cancel_payment` |
//! | Customers | `customers.rs` | `create_customer` |
//! | Subscriptions | `subscriptions.rs` | `create_subscription` |
//!
//! A gateway cannot be told from outside how a customer's card behaves, so the suite asks a
//! [`GatewayFixture`] for customers of each kind (at Stripe: customers with the test cards that
//! succeed, decline or need authentication) and reads back what the gateway recorded (the
//! amount of a payment, the user of a subscription). What a gateway does not offer
//! (subscriptions) or a fixture cannot make happen (a payment that stays processing) the fixture
//! says explicitly, with the reason, as [`Unsupported`]: the checks that need it are reported
//! [`Verdict::Skipped`] with that reason, never passed silently.
//!
//! # Running it
//! [`run`] runs every check against one gateway and returns a [`SuiteReport`]: each check
//! passed, skipped (and why) or failed with a [`Violation`] naming the [`Clause`] it found
//! broken. The macro [`payment_gateway_conformance!`](crate::payment_gateway_conformance)
//! expands one `#[tokio::test]` per check instead, each panicking with its violation, so that a
//! test runner lists the failing check by name.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use token_billing::SandboxGateway;
//! use token_billing::testing::gateway::{self, SandboxFixture};
//!
//! let sandbox = SandboxGateway::new();
//! let report = gateway::run(&sandbox, &SandboxFixture(sandbox.clone())).await;
//! assert!(report.violations().is_empty(), "{report}");
//! assert!(report.skipped().is_empty(), "the sandbox fixture makes every case");
//! report.assert_conforms();
//! # });
//! ```

mod cancel;
mod collect;
mod customers;
mod idempotency;
mod lookup;
mod subscriptions;

use std::fmt;

use async_trait::async_trait;
use uuid::Uuid;

use crate::domain::{Charge, ChargeKind, ChargeStatus, CustomerId, Money, NewCharge, PeriodKey, Plan, UserId};
use crate::gateway::{GatewayError, PaymentGateway, PaymentOutcome, PaymentRequest, PaymentStatus, Subscription};

/// A clause of the [`PaymentGateway`] contract, as its `# Contract` names it in bold.
///
/// # Example
/// ```
/// use token_billing::testing::gateway::Clause;
///
/// assert_eq!(Clause::Cancel.to_string(), "Cancel");
/// assert_eq!(Clause::LookupByChargeKey.name(), "Look-up by charge key");
/// assert!(Clause::Cancel.text().contains("MUST NOT cancel a succeeded payment"));
/// assert_eq!(Clause::ALL.len(), 9);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Clause {
    /// A key already used never makes a second payment: it answers the first.
    Idempotency,
    /// A key never used before is a new attempt, never a replay of an earlier round.
    NewRounds,
    /// `collect` answers `Ok` only with the payment's state, reported as it is.
    KnownOutcomes,
    /// Declined or rejected only when nothing was collected.
    NothingCollectedOnRefusal,
    /// The payment is for exactly the charge's amount, in minor units.
    MinorUnits,
    /// `find_payment` finds a charge's payments by its key.
    LookupByChargeKey,
    /// `cancel_payment` cancels what may still succeed, never what succeeded.
    Cancel,
    /// `create_customer` opens an accepted customer, once per user.
    Customers,
    /// `create_subscription` subscribes a user's customer to a plan, once.
    Subscriptions,
}

impl Clause {
    /// Every clause, in the order the contract states them.
    pub const ALL: [Clause; 9] = [
        Clause::Idempotency,
        Clause::NewRounds,
        Clause::KnownOutcomes,
        Clause::NothingCollectedOnRefusal,
        Clause::MinorUnits,
        Clause::LookupByChargeKey,
        Clause::Cancel,
        Clause::Customers,
        Clause::Subscriptions,
    ];

    /// The clause's name, as the contract writes it in bold.
    pub fn name(self) -> &'static str {
        match self {
            Clause::Idempotency => "Idempotency",
            Clause::NewRounds => "New rounds",
            Clause::KnownOutcomes => "Known outcomes",
            Clause::NothingCollectedOnRefusal => "Nothing collected on refusal",
            Clause::MinorUnits => "Minor units",
            Clause::LookupByChargeKey => "Look-up by charge key",
            Clause::Cancel => "Cancel",
            Clause::Customers => "Customers",
            Clause::Subscriptions => "Subscriptions",
        }
    }

    /// What the clause demands, in a sentence (the contract's text, shortened).
    pub fn text(self) -> &'static str {
        match self {
            Clause::Idempotency => {
                "collect with an idempotency key already used MUST NOT create a second payment: it answers the \
                 first payment"
            }
            Clause::NewRounds => {
                "a key never used before (a later round) MUST be a new attempt on the customer's current payment \
                 method, never a replay"
            }
            Clause::KnownOutcomes => {
                "collect MUST return Ok only with the payment's state, reported as it is: Succeeded, Declined with \
                 the decline code, RequiresAction, Processing"
            }
            Clause::NothingCollectedOnRefusal => {
                "collect MUST NOT report Declined or Rejected unless nothing was collected; an unknown customer is \
                 refused"
            }
            Clause::MinorUnits => "the payment MUST be for exactly the charge's amount, in its currency's minor units",
            Clause::LookupByChargeKey => {
                "find_payment MUST find a charge's payments by its key in any round: a success first, else one in \
                 flight; None when there is none to keep; never another charge's"
            }
            Clause::Cancel => {
                "cancel_payment MUST cancel a payment awaiting the customer and MUST NOT cancel a succeeded \
                 payment, which it reports as Succeeded"
            }
            Clause::Customers => {
                "create_customer MUST open a customer the gateway accepts, and answer the same customer for the \
                 same user"
            }
            Clause::Subscriptions => {
                "create_subscription MUST subscribe the customer to the plan for the user, once per user and plan"
            }
        }
    }
}

impl fmt::Display for Clause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A check of the suite. Each checks one clause (its [`clause`](Self::clause)), and may find
/// another broken on the way (a [`Violation`] names the clause it found broken).
///
/// # Example
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use token_billing::SandboxGateway;
/// use token_billing::testing::gateway::{Check, Clause, SandboxFixture, Verdict};
///
/// assert!(Check::ALL.iter().any(|check| check.clause() == Clause::Subscriptions));
/// let check = Check::SucceededPaymentIsNotCanceled;
/// assert_eq!(check.clause(), Clause::Cancel);
/// assert_eq!(check.name(), "a_succeeded_payment_is_not_canceled");
/// let sandbox = SandboxGateway::new();
/// let verdict = check.run(&sandbox, &SandboxFixture(sandbox.clone())).await;
/// assert_eq!(verdict.unwrap(), Verdict::Passed);
/// # });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Check {
    /// A payment that collects the money is `Succeeded`, with its reference and no decline code.
    SucceededIsReportedSucceeded,
    /// A declined payment is `Declined` with the fixture's decline code.
    DeclineIsReportedWithItsCode,
    /// A payment that needs authentication is `RequiresAction`.
    AuthenticationIsReportedRequiresAction,
    /// A payment whose outcome comes later is `Processing` (skipped when the fixture cannot make
    /// one).
    ProcessingIsReportedProcessing,
    /// A request for a customer the gateway does not know is refused, and collects nothing.
    UnknownCustomerIsRefused,
    /// Amounts in two-, zero- and three-decimal currencies are charged exactly.
    AmountsAreInMinorUnits,
    /// The same key again answers the first payment, for each kind of outcome.
    ReusedKeyAnswersTheFirstPayment,
    /// A later round's key is a new attempt: a charge declined once is paid once the card works.
    NewRoundIsANewAttempt,
    /// A charge never collected has no payment, even beside a charge whose key extends its key.
    NeverCollectedHasNoPayment,
    /// A payment is found by its charge after its answer was lost.
    FoundAfterTheAnswerWasLost,
    /// A payment awaiting the customer is found.
    AwaitingCustomerIsFound,
    /// A processing payment is found (skipped when the fixture cannot make one).
    ProcessingIsFound,
    /// A charge whose only payment was declined has no payment to keep.
    DeclinedHasNoPaymentToKeep,
    /// A later round's success is found before an earlier payment still awaiting the customer.
    SuccessIsFoundBeforeOneInFlight,
    /// A payment awaiting the customer is canceled, and no longer found.
    AwaitingCustomerIsCanceled,
    /// A processing payment is canceled or reported processing (skipped when the fixture cannot
    /// make one).
    ProcessingIsCanceledOrReported,
    /// A succeeded payment is not canceled: it is reported succeeded, and still found.
    SucceededPaymentIsNotCanceled,
    /// A payment id the gateway never issued is refused.
    UnknownPaymentIsRefused,
    /// A customer opened by the gateway is accepted: with a card that pays, it pays.
    OpenedCustomerIsAccepted,
    /// A user's customer is opened once; another user gets another.
    CustomerIsOpenedOncePerUser,
    /// A subscription names its customer and plan, and the gateway ties it to its user (skipped
    /// for a gateway without subscriptions).
    SubscriptionNamesItsUser,
    /// A subscription is made once per user and plan (skipped for a gateway without
    /// subscriptions).
    SubscriptionIsMadeOncePerUserAndPlan,
}

impl Check {
    /// Every check, grouped by clause in the contract's order.
    pub const ALL: [Check; 22] = [
        Check::SucceededIsReportedSucceeded,
        Check::DeclineIsReportedWithItsCode,
        Check::AuthenticationIsReportedRequiresAction,
        Check::ProcessingIsReportedProcessing,
        Check::UnknownCustomerIsRefused,
        Check::AmountsAreInMinorUnits,
        Check::ReusedKeyAnswersTheFirstPayment,
        Check::NewRoundIsANewAttempt,
        Check::NeverCollectedHasNoPayment,
        Check::FoundAfterTheAnswerWasLost,
        Check::AwaitingCustomerIsFound,
        Check::ProcessingIsFound,
        Check::DeclinedHasNoPaymentToKeep,
        Check::SuccessIsFoundBeforeOneInFlight,
        Check::AwaitingCustomerIsCanceled,
        Check::ProcessingIsCanceledOrReported,
        Check::SucceededPaymentIsNotCanceled,
        Check::UnknownPaymentIsRefused,
        Check::OpenedCustomerIsAccepted,
        Check::CustomerIsOpenedOncePerUser,
        Check::SubscriptionNamesItsUser,
        Check::SubscriptionIsMadeOncePerUserAndPlan,
    ];

    /// The check's name, in snake case: the name of its test in
    /// [`payment_gateway_conformance!`](crate::payment_gateway_conformance).
    pub fn name(self) -> &'static str {
        match self {
            Check::SucceededIsReportedSucceeded => "a_success_is_reported_succeeded",
            Check::DeclineIsReportedWithItsCode => "a_decline_is_reported_with_its_code",
            Check::AuthenticationIsReportedRequiresAction => "authentication_is_reported_as_requires_action",
            Check::ProcessingIsReportedProcessing => "a_processing_payment_is_reported_processing",
            Check::UnknownCustomerIsRefused => "an_unknown_customer_is_refused_and_pays_nothing",
            Check::AmountsAreInMinorUnits => "amounts_are_charged_in_minor_units",
            Check::ReusedKeyAnswersTheFirstPayment => "a_reused_key_answers_the_first_payment",
            Check::NewRoundIsANewAttempt => "a_new_round_is_a_new_attempt",
            Check::NeverCollectedHasNoPayment => "a_charge_never_collected_has_no_payment",
            Check::FoundAfterTheAnswerWasLost => "a_payment_is_found_after_its_answer_was_lost",
            Check::AwaitingCustomerIsFound => "a_payment_awaiting_the_customer_is_found",
            Check::ProcessingIsFound => "a_processing_payment_is_found",
            Check::DeclinedHasNoPaymentToKeep => "a_declined_charge_has_no_payment_to_keep",
            Check::SuccessIsFoundBeforeOneInFlight => "a_success_is_found_before_a_payment_in_flight",
            Check::AwaitingCustomerIsCanceled => "a_payment_awaiting_the_customer_is_canceled",
            Check::ProcessingIsCanceledOrReported => "a_processing_payment_is_canceled_or_reported_processing",
            Check::SucceededPaymentIsNotCanceled => "a_succeeded_payment_is_not_canceled",
            Check::UnknownPaymentIsRefused => "an_unknown_payment_is_refused",
            Check::OpenedCustomerIsAccepted => "an_opened_customer_is_accepted",
            Check::CustomerIsOpenedOncePerUser => "a_customer_is_opened_once_per_user",
            Check::SubscriptionNamesItsUser => "a_subscription_names_its_customer_plan_and_user",
            Check::SubscriptionIsMadeOncePerUserAndPlan => "a_subscription_is_made_once_per_user_and_plan",
        }
    }

    /// The clause the check checks.
    pub fn clause(self) -> Clause {
        match self {
            Check::SucceededIsReportedSucceeded
            | Check::DeclineIsReportedWithItsCode
            | Check::AuthenticationIsReportedRequiresAction
            | Check::ProcessingIsReportedProcessing => Clause::KnownOutcomes,
            Check::UnknownCustomerIsRefused => Clause::NothingCollectedOnRefusal,
            Check::AmountsAreInMinorUnits => Clause::MinorUnits,
            Check::ReusedKeyAnswersTheFirstPayment => Clause::Idempotency,
            Check::NewRoundIsANewAttempt => Clause::NewRounds,
            Check::NeverCollectedHasNoPayment
            | Check::FoundAfterTheAnswerWasLost
            | Check::AwaitingCustomerIsFound
            | Check::ProcessingIsFound
            | Check::DeclinedHasNoPaymentToKeep
            | Check::SuccessIsFoundBeforeOneInFlight => Clause::LookupByChargeKey,
            Check::AwaitingCustomerIsCanceled
            | Check::ProcessingIsCanceledOrReported
            | Check::SucceededPaymentIsNotCanceled
            | Check::UnknownPaymentIsRefused => Clause::Cancel,
            Check::OpenedCustomerIsAccepted | Check::CustomerIsOpenedOncePerUser => Clause::Customers,
            Check::SubscriptionNamesItsUser | Check::SubscriptionIsMadeOncePerUserAndPlan => Clause::Subscriptions,
        }
    }

    /// Runs the check against `gateway`, with customers from `fixture`.
    ///
    /// # Errors
    /// The [`Violation`] found, naming the clause broken.
    pub async fn run(self, gateway: &dyn PaymentGateway, fixture: &dyn GatewayFixture) -> Result<Verdict, Violation> {
        let probe = Probe {
            check: self,
            gateway,
            fixture,
        };
        match self {
            Check::SucceededIsReportedSucceeded => collect::succeeded_is_reported_succeeded(&probe).await,
            Check::DeclineIsReportedWithItsCode => collect::decline_is_reported_with_its_code(&probe).await,
            Check::AuthenticationIsReportedRequiresAction => {
                collect::authentication_is_reported_requires_action(&probe).await
            }
            Check::ProcessingIsReportedProcessing => collect::processing_is_reported_processing(&probe).await,
            Check::UnknownCustomerIsRefused => collect::unknown_customer_is_refused(&probe).await,
            Check::AmountsAreInMinorUnits => collect::amounts_are_in_minor_units(&probe).await,
            Check::ReusedKeyAnswersTheFirstPayment => idempotency::reused_key_answers_the_first_payment(&probe).await,
            Check::NewRoundIsANewAttempt => idempotency::new_round_is_a_new_attempt(&probe).await,
            Check::NeverCollectedHasNoPayment => lookup::never_collected_has_no_payment(&probe).await,
            Check::FoundAfterTheAnswerWasLost => lookup::found_after_the_answer_was_lost(&probe).await,
            Check::AwaitingCustomerIsFound => lookup::awaiting_customer_is_found(&probe).await,
            Check::ProcessingIsFound => lookup::processing_is_found(&probe).await,
            Check::DeclinedHasNoPaymentToKeep => lookup::declined_has_no_payment_to_keep(&probe).await,
            Check::SuccessIsFoundBeforeOneInFlight => lookup::success_is_found_before_one_in_flight(&probe).await,
            Check::AwaitingCustomerIsCanceled => cancel::awaiting_customer_is_canceled(&probe).await,
            Check::ProcessingIsCanceledOrReported => cancel::processing_is_canceled_or_reported(&probe).await,
            Check::SucceededPaymentIsNotCanceled => cancel::succeeded_payment_is_not_canceled(&probe).await,
            Check::UnknownPaymentIsRefused => cancel::unknown_payment_is_refused(&probe).await,
            Check::OpenedCustomerIsAccepted => customers::opened_customer_is_accepted(&probe).await,
            Check::CustomerIsOpenedOncePerUser => customers::customer_is_opened_once_per_user(&probe).await,
            Check::SubscriptionNamesItsUser => subscriptions::subscription_names_its_user(&probe).await,
            Check::SubscriptionIsMadeOncePerUserAndPlan => {
                subscriptions::subscription_is_made_once_per_user_and_plan(&probe).await
            }
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a gateway does not offer, or a fixture cannot make happen, and why: the checks that
/// need it are skipped, and reported skipped with this reason.
///
/// # Example
/// ```
/// use token_billing::testing::gateway::Unsupported;
///
/// let unsupported = Unsupported("cards never stay processing at this test server");
/// assert_eq!(unsupported.to_string(), "cards never stay processing at this test server");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported(pub &'static str);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// How a check that found nothing broken ended.
///
/// # Example
/// ```
/// use token_billing::testing::gateway::{Unsupported, Verdict};
///
/// let skipped = Verdict::Skipped(Unsupported("no subscriptions"));
/// assert_ne!(skipped, Verdict::Passed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Everything it checks holds.
    Passed,
    /// Not run: the fixture says the gateway or the fixture cannot do what it needs.
    Skipped(Unsupported),
}

/// A clause found broken: by which check, and what it saw.
///
/// # Example
/// ```
/// use token_billing::testing::gateway::{Check, Clause, Violation};
///
/// let violation = Violation {
///     check: Check::SucceededPaymentIsNotCanceled,
///     clause: Clause::Cancel,
///     detail: "cancel_payment answered Canceled for a succeeded payment".to_owned(),
/// };
/// assert!(violation.to_string().contains("violates the contract clause \"Cancel\""));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "gateway conformance: {check} violates the contract clause \"{clause}\" ({}): {detail}",
    clause.text()
)]
pub struct Violation {
    /// The check that found it.
    pub check: Check,
    /// The clause broken.
    pub clause: Clause,
    /// What the check saw.
    pub detail: String,
}

/// What [`run`] found: each check's verdict or violation, in [`Check::ALL`]'s order.
///
/// # Example
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use token_billing::SandboxGateway;
/// use token_billing::testing::gateway::{self, Check, SandboxFixture};
///
/// let sandbox = SandboxGateway::new();
/// let report = gateway::run(&sandbox, &SandboxFixture(sandbox.clone())).await;
/// assert_eq!(report.results().len(), Check::ALL.len());
/// assert_eq!(report.passed(), Check::ALL);
/// assert!(report.skipped().is_empty());
/// assert!(report.violations().is_empty());
/// assert!(report.violated_clauses().is_empty());
/// report.assert_conforms();
/// assert!(report.to_string().starts_with("gateway conformance: 22 passed, 0 skipped, 0 failed"));
/// # });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteReport {
    results: Vec<(Check, Result<Verdict, Violation>)>,
}

impl SuiteReport {
    /// Every check with its verdict or violation.
    pub fn results(&self) -> &[(Check, Result<Verdict, Violation>)] {
        &self.results
    }

    /// The checks that passed.
    pub fn passed(&self) -> Vec<Check> {
        self.results
            .iter()
            .filter(|(_, result)| result == &Ok(Verdict::Passed))
            .map(|(check, _)| *check)
            .collect()
    }

    /// The checks skipped, with the reason the fixture gave.
    pub fn skipped(&self) -> Vec<(Check, Unsupported)> {
        self.results
            .iter()
            .filter_map(|(check, result)| match result {
                Ok(Verdict::Skipped(why)) => Some((*check, *why)),
                _ => None,
            })
            .collect()
    }

    /// The violations found.
    pub fn violations(&self) -> Vec<&Violation> {
        self.results
            .iter()
            .filter_map(|(_, result)| result.as_ref().err())
            .collect()
    }

    /// The clauses found broken, each once, in the contract's order.
    pub fn violated_clauses(&self) -> Vec<Clause> {
        Clause::ALL
            .into_iter()
            .filter(|clause| self.violations().iter().any(|v| v.clause == *clause))
            .collect()
    }

    /// Panics, listing every violation, when any clause was found broken.
    ///
    /// # Panics
    /// When a check found a violation.
    pub fn assert_conforms(&self) {
        assert!(self.violations().is_empty(), "{self}");
    }
}

impl fmt::Display for SuiteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let violations = self.violations();
        writeln!(
            f,
            "gateway conformance: {} passed, {} skipped, {} failed",
            self.passed().len(),
            self.skipped().len(),
            violations.len()
        )?;
        for (check, why) in self.skipped() {
            writeln!(f, "  skipped {check}: {why}")?;
        }
        for violation in violations {
            writeln!(f, "  {violation}")?;
        }
        Ok(())
    }
}

/// Runs every check ([`Check::ALL`]) against `gateway`, one after the other, with customers
/// from `fixture`. Each check uses new customers, users and charges of its own, so one check's
/// failure does not disturb another's, and a gateway holding other data is fine.
///
/// # Example
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use token_billing::SandboxGateway;
/// use token_billing::testing::gateway::{self, SandboxFixture};
///
/// let sandbox = SandboxGateway::new();
/// gateway::run(&sandbox, &SandboxFixture(sandbox.clone())).await.assert_conforms();
/// # });
/// ```
pub async fn run(gateway: &dyn PaymentGateway, fixture: &dyn GatewayFixture) -> SuiteReport {
    let mut results = Vec::with_capacity(Check::ALL.len());
    for check in Check::ALL {
        results.push((check, check.run(gateway, fixture).await));
    }
    SuiteReport { results }
}

/// Customers of each kind for the conformance suite, and read-backs of what the gateway
/// recorded. Every method is required: a fixture states what it cannot do with
/// [`Unsupported`], and the suite then reports the checks that need it skipped.
///
/// # Example
/// A fixture for a gateway that wraps the sandbox and has no subscriptions:
/// ```
/// use async_trait::async_trait;
/// use token_billing::testing::gateway::{GatewayFixture, SandboxFixture, Unsupported};
/// use token_billing::{CustomerId, Money, Subscription, UserId};
///
/// struct NoSubscriptions(SandboxFixture);
///
/// #[async_trait]
/// impl GatewayFixture for NoSubscriptions {
///     async fn paying_customer(&self) -> CustomerId { self.0.paying_customer().await }
///     async fn declining_customer(&self) -> CustomerId { self.0.declining_customer().await }
///     fn decline_code(&self) -> &str { self.0.decline_code() }
///     async fn authenticating_customer(&self) -> CustomerId { self.0.authenticating_customer().await }
///     async fn processing_customer(&self) -> Result<CustomerId, Unsupported> {
///         self.0.processing_customer().await
///     }
///     async fn give_paying_card(&self, customer: &CustomerId) { self.0.give_paying_card(customer).await }
///     async fn amount_charged(&self, payment_id: &str) -> Option<Money> { self.0.amount_charged(payment_id).await }
///     fn subscriptions(&self) -> Result<(), Unsupported> {
///         Err(Unsupported("this gateway collects the fixed fee through the library, not subscriptions"))
///     }
///     async fn subscriber(&self, _subscription: &Subscription) -> Option<UserId> { None }
/// }
/// ```
#[async_trait]
pub trait GatewayFixture: Send + Sync {
    /// A new customer whose payments succeed.
    async fn paying_customer(&self) -> CustomerId;
    /// A new customer whose payments are declined, with [`decline_code`](Self::decline_code).
    async fn declining_customer(&self) -> CustomerId;
    /// The decline code the gateway reports for the payments of a
    /// [`declining_customer`](Self::declining_customer) (`insufficient_funds`, `card_declined`).
    fn decline_code(&self) -> &str;
    /// A new customer whose payments need authentication (3-D Secure).
    async fn authenticating_customer(&self) -> CustomerId;
    /// A new customer whose payments are accepted and stay processing, or why the fixture
    /// cannot make one.
    async fn processing_customer(&self) -> Result<CustomerId, Unsupported>;
    /// Gives an existing customer (a declining one, or one opened by
    /// [`create_customer`](PaymentGateway::create_customer)) a payment method that pays, as
    /// the customer's default from now on.
    async fn give_paying_card(&self, customer: &CustomerId);
    /// The amount of the payment `payment_id` as the gateway's own records show it, in the
    /// library's terms (the currency's minor units as [`Money`] counts them); `None` for a
    /// payment the gateway does not know.
    async fn amount_charged(&self, payment_id: &str) -> Option<Money>;
    /// Whether the gateway offers subscriptions; `Err` with the reason skips the
    /// subscription checks.
    fn subscriptions(&self) -> Result<(), Unsupported>;
    /// The user the gateway's own records tie a subscription to (the user its paid invoices
    /// will be reported for). Called only when [`subscriptions`](Self::subscriptions) is `Ok`.
    async fn subscriber(&self, subscription: &Subscription) -> Option<UserId>;
}

/// The fixture for [`SandboxGateway`](crate::SandboxGateway): sets card behaviours directly and
/// reads the sandbox's ledger. It makes every case, processing payments included.
///
/// # Example
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use token_billing::SandboxGateway;
/// use token_billing::testing::gateway::{GatewayFixture, SandboxFixture};
///
/// let sandbox = SandboxGateway::new();
/// let fixture = SandboxFixture(sandbox.clone());
/// assert!(fixture.processing_customer().await.is_ok());
/// assert!(fixture.subscriptions().is_ok());
/// assert_eq!(fixture.decline_code(), "insufficient_funds");
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct SandboxFixture(pub crate::SandboxGateway);

impl SandboxFixture {
    fn customer(&self, behaviour: crate::CardBehaviour) -> CustomerId {
        let id = CustomerId::new(format!("cus_fixture_{}", Uuid::new_v4().simple())).expect("a valid customer id");
        self.0.add_customer(id.clone(), behaviour);
        id
    }
}

/// The decline code of the sandbox fixture's declining customers.
const SANDBOX_DECLINE_CODE: &str = "insufficient_funds";

#[async_trait]
impl GatewayFixture for SandboxFixture {
    async fn paying_customer(&self) -> CustomerId {
        self.customer(crate::CardBehaviour::Succeeds)
    }
    async fn declining_customer(&self) -> CustomerId {
        self.customer(crate::CardBehaviour::Declines {
            code: SANDBOX_DECLINE_CODE.to_owned(),
        })
    }
    fn decline_code(&self) -> &str {
        SANDBOX_DECLINE_CODE
    }
    async fn authenticating_customer(&self) -> CustomerId {
        self.customer(crate::CardBehaviour::RequiresAuthentication)
    }
    async fn processing_customer(&self) -> Result<CustomerId, Unsupported> {
        Ok(self.customer(crate::CardBehaviour::Processing))
    }
    async fn give_paying_card(&self, customer: &CustomerId) {
        // Only a customer the sandbox knows: adding one here would hide a gateway that answers
        // customers it never opened. An unknown customer's payments are then refused.
        let _unknown = self.0.set_behaviour(customer, crate::CardBehaviour::Succeeds);
    }
    async fn amount_charged(&self, payment_id: &str) -> Option<Money> {
        self.0
            .payments()
            .into_iter()
            .find(|payment| payment.payment_id == payment_id)
            .map(|payment| payment.amount)
    }
    fn subscriptions(&self) -> Result<(), Unsupported> {
        Ok(())
    }
    async fn subscriber(&self, subscription: &Subscription) -> Option<UserId> {
        self.0.subscriber(&subscription.subscription_id)
    }
}

/// One check under way: the gateway, the fixture, and the check, to name in a violation.
struct Probe<'a> {
    check: Check,
    gateway: &'a dyn PaymentGateway,
    fixture: &'a dyn GatewayFixture,
}

impl Probe<'_> {
    /// A violation of `clause` found by this check.
    fn violation(&self, clause: Clause, detail: impl Into<String>) -> Violation {
        Violation {
            check: self.check,
            clause,
            detail: detail.into(),
        }
    }

    /// `Ok` when `holds`, else a violation of `clause` with the detail `detail` makes.
    fn ensure(&self, holds: bool, clause: Clause, detail: impl FnOnce() -> String) -> Result<(), Violation> {
        if holds {
            Ok(())
        } else {
            Err(self.violation(clause, detail()))
        }
    }

    /// `collect` for `charge` in `round` for `customer`, as the service would call it.
    async fn try_collect(
        &self,
        charge: &Charge,
        round: u32,
        customer: &CustomerId,
    ) -> Result<PaymentOutcome, GatewayError> {
        let charge = Charge {
            round,
            ..charge.clone()
        };
        let idempotency_key = charge.idempotency_key();
        self.gateway
            .collect(&PaymentRequest {
                charge: &charge,
                idempotency_key: &idempotency_key,
                customer,
            })
            .await
    }

    /// `collect` that must answer an outcome; an error is a violation of `clause`.
    async fn collect(
        &self,
        charge: &Charge,
        round: u32,
        customer: &CustomerId,
        clause: Clause,
    ) -> Result<PaymentOutcome, Violation> {
        self.try_collect(charge, round, customer).await.map_err(|error| {
            self.violation(
                clause,
                format!("collect of {} round {round} failed: {error} ({error:?})", charge.key),
            )
        })
    }

    /// `collect`, for a customer the fixture made to answer `expected`: any other answer
    /// violates [`Clause::KnownOutcomes`].
    async fn collect_as(
        &self,
        charge: &Charge,
        round: u32,
        customer: &CustomerId,
        expected: PaymentStatus,
    ) -> Result<PaymentOutcome, Violation> {
        let outcome = self.collect(charge, round, customer, Clause::KnownOutcomes).await?;
        self.ensure(outcome.status == expected, Clause::KnownOutcomes, || {
            format!(
                "a payment its customer makes {expected:?} was answered {}",
                shown(&outcome)
            )
        })?;
        Ok(outcome)
    }

    /// `find_payment` for `charge`; an error is a violation of [`Clause::LookupByChargeKey`].
    async fn find(&self, charge: &Charge) -> Result<Option<PaymentOutcome>, Violation> {
        self.gateway.find_payment(&charge.key).await.map_err(|error| {
            self.violation(
                Clause::LookupByChargeKey,
                format!("find_payment of {} failed: {error} ({error:?})", charge.key),
            )
        })
    }

    /// `cancel_payment`; an error is a violation of [`Clause::Cancel`].
    async fn cancel(&self, payment_id: &str) -> Result<PaymentOutcome, Violation> {
        self.gateway.cancel_payment(payment_id).await.map_err(|error| {
            self.violation(
                Clause::Cancel,
                format!("cancel_payment of {payment_id} failed: {error} ({error:?})"),
            )
        })
    }
}

/// A new user, with a name that says which check made it.
fn new_user(tag: &str) -> UserId {
    UserId::new(format!("gw-{tag}-{}", &Uuid::new_v4().simple().to_string()[..16])).expect("a valid user id")
}

/// Block 1 of a new user's November 2026, as the service would collect it: BRL 100.00 under the
/// default plan.
fn new_charge() -> Charge {
    charge_of(&new_user("charge"), 1)
}

/// Block `block` of `user`'s November 2026.
fn charge_of(user: &UserId, block: u64) -> Charge {
    let period = PeriodKey::new(2026, 11).expect("valid");
    let charge = NewCharge::block(&Plan::default(), user, period, block, None).into_charge(
        Uuid::new_v4(),
        ChargeStatus::Pending,
        chrono::Utc::now(),
    );
    debug_assert_eq!(charge.kind, ChargeKind::Block);
    charge
}

/// Shows an outcome briefly in a violation's detail.
fn shown(outcome: &PaymentOutcome) -> String {
    format!(
        "{} {:?}{}",
        if outcome.payment_id.is_empty() {
            "(no id)"
        } else {
            &outcome.payment_id
        },
        outcome.status,
        outcome
            .decline_code
            .as_deref()
            .map(|code| format!(" ({code})"))
            .unwrap_or_default()
    )
}

/// Shows a look-up's answer briefly in a violation's detail.
fn shown_found(found: &Option<PaymentOutcome>) -> String {
    found.as_ref().map_or_else(|| "None".to_owned(), shown)
}
