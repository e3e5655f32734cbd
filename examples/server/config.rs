//! The service's configuration, read from the environment (or any lookup, in tests).

use std::sync::Arc;

use token_billing::{
    BillingService, Clock, FeeCollection, InMemoryUsageStore, PaymentGateway, SandboxGateway, SystemClock,
    UnregisteredUsers, UsageStore,
};

use crate::app::AppState;
use crate::auth::Auth;

/// The shortest API key accepted.
pub(crate) const MIN_API_KEY_LEN: usize = 16;

/// Where the service listens unless told.
pub(crate) const DEFAULT_ADDR: &str = "127.0.0.1:3000";

/// The service, configured.
pub(crate) struct Configured {
    /// The handlers' state.
    pub(crate) state: AppState,
    /// The billing service, for the background jobs.
    pub(crate) billing: BillingService,
    /// Where to listen.
    pub(crate) addr: String,
    /// What was chosen, for the log: no secret in it.
    pub(crate) description: String,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Reads the configuration through `env` (a variable's value, `None` when unset or empty).
pub(crate) async fn configure(env: impl Fn(&str) -> Option<String>) -> Result<Configured, Error> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let api_key = env("TOKEN_BILLING_API_KEY").ok_or("set TOKEN_BILLING_API_KEY: the key the host's backend sends")?;
    if api_key.len() < MIN_API_KEY_LEN {
        return Err(format!("TOKEN_BILLING_API_KEY must be at least {MIN_API_KEY_LEN} characters").into());
    }
    let jwt_secret = env("TOKEN_BILLING_JWT_SECRET");
    // Supabase's access tokens name the audience `authenticated`; `*` accepts any.
    let audience = env("TOKEN_BILLING_JWT_AUDIENCE").unwrap_or_else(|| "authenticated".to_owned());
    let auth = Auth::new(&api_key, jwt_secret.as_deref(), (audience != "*").then_some(audience));
    let fee = match env("TOKEN_BILLING_FEE_COLLECTION").as_deref() {
        None | Some("library") => FeeCollection::Library,
        Some("subscription") => FeeCollection::Subscription,
        Some(other) => {
            return Err(format!("TOKEN_BILLING_FEE_COLLECTION is library or subscription, not {other}").into());
        }
    };

    let (store, store_name): (Arc<dyn UsageStore>, &str) = match env("DATABASE_URL") {
        #[cfg(feature = "postgres")]
        Some(url) => (
            Arc::new(token_billing::PostgresUsageStore::connect(&url).await?),
            "PostgreSQL (DATABASE_URL)",
        ),
        #[cfg(not(feature = "postgres"))]
        Some(_) => {
            return Err("DATABASE_URL is set but this build has no PostgreSQL store: add --features postgres".into());
        }
        None => (
            Arc::new(InMemoryUsageStore::new()),
            "in memory (DATABASE_URL is not set)",
        ),
    };

    // With a real gateway, users wait for an account; the sandbox opens one for everybody, so
    // that the original product's examples run as written.
    let sandbox = || -> (Arc<dyn PaymentGateway>, UnregisteredUsers, String) {
        (
            Arc::new(SandboxGateway::new()),
            UnregisteredUsers::OpenCustomer,
            "the in-process sandbox (STRIPE_SECRET_KEY is not set)".to_owned(),
        )
    };
    #[cfg(feature = "stripe")]
    let stripe = match env("STRIPE_SECRET_KEY") {
        Some(_) => Some(token_billing::gateway::stripe::StripeGateway::from_lookup(env)?),
        None => None,
    };
    #[cfg(feature = "stripe")]
    let (gateway, unregistered, gateway_name) = match &stripe {
        Some(stripe) => (
            Arc::new(stripe.clone()) as Arc<dyn PaymentGateway>,
            UnregisteredUsers::Wait,
            format!("Stripe at {} (STRIPE_SECRET_KEY)", stripe.api_base()),
        ),
        None => sandbox(),
    };
    #[cfg(not(feature = "stripe"))]
    let (gateway, unregistered, gateway_name) = match env("STRIPE_SECRET_KEY") {
        Some(_) => {
            return Err("STRIPE_SECRET_KEY is set but this build has no Stripe gateway: add --features stripe".into());
        }
        None => sandbox(),
    };

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let billing = BillingService::builder(store, gateway)
        .clock(clock.clone())
        .fee_collection(fee)
        .unregistered_users(unregistered)
        .build();
    #[cfg(not(feature = "stripe"))]
    let stripe = None;
    let state = AppState::new(billing.clone(), auth, clock, stripe);
    let description = format!(
        "store: {store_name}; gateway: {gateway_name}; fixed fee: {fee:?}; user tokens: {}",
        if jwt_secret.is_some() {
            "accepted (TOKEN_BILLING_JWT_SECRET)"
        } else {
            "refused (TOKEN_BILLING_JWT_SECRET is not set)"
        }
    );
    Ok(Configured {
        state,
        billing,
        addr: env("TOKEN_BILLING_ADDR").unwrap_or_else(|| DEFAULT_ADDR.to_owned()),
        description,
    })
}
