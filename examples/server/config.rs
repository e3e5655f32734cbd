//! The service's configuration, read from the environment (or any lookup, in tests).

use std::sync::Arc;

use token_billing::{
    AlertPolicy, BillingService, Clock, FeeCollection, InMemoryUsageStore, PaymentGateway, SandboxGateway, SystemClock,
    UnregisteredUsers, UsageStore,
};

use crate::alerts::AlertWebhook;
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
    /// What the operator accepted that can cost money or data, for the log at `warn`.
    pub(crate) warnings: Vec<String>,
    /// Where threshold alerts are delivered, when configured.
    pub(crate) alert_webhook: Option<AlertWebhook>,
}

/// Why a database with the sandbox gateway is refused, and how to ask for it.
const SANDBOX_WITH_DATABASE: &str = "DATABASE_URL is set without STRIPE_SECRET_KEY: the sandbox gateway's customers \
     always pay, so charges would be stored as succeeded though no money moved. Set STRIPE_SECRET_KEY, or \
     TOKEN_BILLING_GATEWAY=sandbox to use the sandbox with a database on purpose";

/// Why a real gateway on the in-memory store is refused, and how to ask for it.
const GATEWAY_WITHOUT_DATABASE: &str = "STRIPE_SECRET_KEY is set without DATABASE_URL: the in-memory store forgets \
     every total and charge when the service restarts, so later usage would be under-billed and the period's fixed \
     fee charged again (only Stripe's 24-hour idempotency window would keep it from being paid twice). Set \
     DATABASE_URL (sqlite://billing.db on one machine, postgres://... for several instances), or \
     TOKEN_BILLING_STORE=memory to accept losing that state on purpose";

/// What a restart costs on the in-memory store with a real gateway, logged at `warn`.
const MEMORY_WITH_GATEWAY: &str = "TOKEN_BILLING_STORE=memory with a real gateway: a restart forgets every total \
     and charge. Usage reported after it is added to a total of zero, so the blocks the forgotten usage had brought \
     closer are charged late or never (under-billing), and the period's fixed fee is charged again under the same key: only \
     the gateway (Stripe keeps idempotency keys 24 hours) keeps it from being paid twice";

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Opens the store `DATABASE_URL` names by its scheme: `sqlite:` a SQLite file (feature
/// `sqlite`), `postgres:` or `postgresql:` a PostgreSQL database (feature `postgres`).
async fn open_database(url: &str) -> Result<(Arc<dyn UsageStore>, &'static str), Error> {
    let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
    match scheme {
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok((
            Arc::new(token_billing::SqliteUsageStore::connect(url).await?),
            "SQLite (DATABASE_URL)",
        )),
        #[cfg(not(feature = "sqlite"))]
        "sqlite" => {
            Err("DATABASE_URL names a SQLite file but this build has no SQLite store: add --features sqlite".into())
        }
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok((
            Arc::new(token_billing::PostgresUsageStore::connect(url).await?),
            "PostgreSQL (DATABASE_URL)",
        )),
        #[cfg(not(feature = "postgres"))]
        "postgres" | "postgresql" => {
            Err("DATABASE_URL names PostgreSQL but this build has no PostgreSQL store: add --features postgres".into())
        }
        _ => Err("DATABASE_URL is sqlite://<file> or postgres://<database>".into()),
    }
}

/// Reads the configuration through `env` (a variable's value, `None` when unset or empty).
///
/// `DATABASE_URL` without `STRIPE_SECRET_KEY` is refused unless `TOKEN_BILLING_GATEWAY` is
/// `sandbox`: the durable store would record the sandbox's charges as paid. `STRIPE_SECRET_KEY`
/// without `DATABASE_URL` is refused unless `TOKEN_BILLING_STORE` is `memory`: a restart would
/// forget what was charged.
pub(crate) async fn configure(env: impl Fn(&str) -> Option<String>) -> Result<Configured, Error> {
    // The library's metrics are recorded from the start, for `/metrics`.
    crate::prometheus::recorder();
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    // Clients' credentials are read without surrounding whitespace: a secret kept with it (the
    // newline of a file it was read from) would refuse every request.
    for secret in ["TOKEN_BILLING_API_KEY", "TOKEN_BILLING_JWT_SECRET"] {
        if env(secret).is_some_and(|value| value.trim() != value) {
            return Err(format!("{secret} begins or ends with whitespace (a newline from a file?): remove it").into());
        }
    }
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

    // The gateway is settled before the store, so that a refused configuration never touches
    // the database.
    let chosen_gateway = env("TOKEN_BILLING_GATEWAY");
    let stripe_key = env("STRIPE_SECRET_KEY").is_some();
    let use_stripe = match chosen_gateway.as_deref() {
        None => stripe_key,
        Some("stripe") if stripe_key => true,
        Some("stripe") => return Err("TOKEN_BILLING_GATEWAY=stripe needs STRIPE_SECRET_KEY".into()),
        Some("sandbox") if stripe_key => {
            return Err("TOKEN_BILLING_GATEWAY=sandbox, but STRIPE_SECRET_KEY is set: unset one of them".into());
        }
        Some("sandbox") => false,
        Some(other) => return Err(format!("TOKEN_BILLING_GATEWAY is sandbox or stripe, not {other}").into()),
    };
    let database_url = env("DATABASE_URL");
    // The sandbox's customers always pay: with a durable store, its charges would be kept as
    // collected though no money moved. Only an operator who names the sandbox gets that.
    if database_url.is_some() && !use_stripe && chosen_gateway.is_none() {
        return Err(SANDBOX_WITH_DATABASE.into());
    }
    // A real gateway moves money the in-memory store forgets on restart. Only an operator who
    // names the in-memory store gets that.
    let chosen_store = env("TOKEN_BILLING_STORE");
    match chosen_store.as_deref() {
        None if use_stripe && database_url.is_none() => return Err(GATEWAY_WITHOUT_DATABASE.into()),
        None => {}
        Some("memory") if database_url.is_some() => {
            return Err("TOKEN_BILLING_STORE=memory, but DATABASE_URL is set: unset one of them".into());
        }
        Some("memory") => {}
        Some(other) => {
            return Err(format!(
                "TOKEN_BILLING_STORE is memory (the only store named; DATABASE_URL chooses SQLite or PostgreSQL), not {other}"
            )
            .into());
        }
    }
    let mut warnings = Vec::new();
    if use_stripe && database_url.is_none() {
        warnings.push(MEMORY_WITH_GATEWAY.to_owned());
    }

    let (store, store_name): (Arc<dyn UsageStore>, &str) = match database_url {
        Some(url) => open_database(&url).await?,
        None if chosen_store.is_some() => (
            Arc::new(InMemoryUsageStore::new()),
            "in memory (TOKEN_BILLING_STORE=memory)",
        ),
        None => (
            Arc::new(InMemoryUsageStore::new()),
            "in memory (DATABASE_URL is not set)",
        ),
    };

    // With a real gateway, users wait for an account; the sandbox opens one for everybody, and
    // takes the customer ids the host names (create-subscription's) as customers that pay, so
    // that the original product's examples run as written.
    let sandbox_name = if chosen_gateway.is_some() {
        "the in-process sandbox (TOKEN_BILLING_GATEWAY=sandbox)"
    } else {
        "the in-process sandbox (STRIPE_SECRET_KEY is not set)"
    };
    let sandbox = || -> (Arc<dyn PaymentGateway>, UnregisteredUsers, String) {
        (
            Arc::new(SandboxGateway::accepting_unknown_customers()),
            UnregisteredUsers::OpenCustomer,
            sandbox_name.to_owned(),
        )
    };
    #[cfg(feature = "stripe")]
    let stripe = if use_stripe {
        Some(token_billing::gateway::stripe::StripeGateway::from_lookup(env)?)
    } else {
        None
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
    let (gateway, unregistered, gateway_name) = if use_stripe {
        return Err("STRIPE_SECRET_KEY is set but this build has no Stripe gateway: add --features stripe".into());
    } else {
        sandbox()
    };

    let alert_webhook = match (
        env("TOKEN_BILLING_ALERT_WEBHOOK_URL"),
        env("TOKEN_BILLING_ALERT_WEBHOOK_SECRET"),
    ) {
        (Some(url), Some(secret)) => Some(AlertWebhook::new(&url, &secret)?),
        (None, None) => None,
        _ => {
            return Err(
                "set both TOKEN_BILLING_ALERT_WEBHOOK_URL and TOKEN_BILLING_ALERT_WEBHOOK_SECRET, or neither".into(),
            );
        }
    };

    let (plans, plans_name) = match env("TOKEN_BILLING_PLANS") {
        Some(path) => {
            let plans = crate::plans::read(std::path::Path::new(&path))?;
            let ids: Vec<&str> = plans.iter().map(|(id, _)| id.as_str()).collect();
            let name = format!("{} from {path} (TOKEN_BILLING_PLANS)", ids.join(", "));
            (plans, name)
        }
        None => (
            Vec::new(),
            "the original product's (TOKEN_BILLING_PLANS is not set)".to_owned(),
        ),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let billing = plans
        .into_iter()
        .fold(BillingService::builder(store, gateway), |builder, (id, plan)| {
            builder.add_plan(id, plan)
        })
        .clock(clock.clone())
        .fee_collection(fee)
        .unregistered_users(unregistered)
        .alerts(AlertPolicy::standard())
        .build();
    #[cfg(not(feature = "stripe"))]
    let stripe = None;
    let state = AppState::new(billing.clone(), auth, clock, stripe);
    let description = format!(
        "store: {store_name}; gateway: {gateway_name}; plans: {plans_name}; fixed fee: {}; user tokens: {}; alerts: {}",
        match fee {
            FeeCollection::Subscription =>
                "collected by a gateway subscription (TOKEN_BILLING_FEE_COLLECTION=subscription)",
            _ => "collected by the library when a period opens (TOKEN_BILLING_FEE_COLLECTION=library)",
        },
        if jwt_secret.is_some() {
            "accepted (TOKEN_BILLING_JWT_SECRET)"
        } else {
            "refused (TOKEN_BILLING_JWT_SECRET is not set)"
        },
        match &alert_webhook {
            Some(_) => "delivered to TOKEN_BILLING_ALERT_WEBHOOK_URL",
            None => "kept for the dashboard (TOKEN_BILLING_ALERT_WEBHOOK_URL is not set)",
        }
    );
    Ok(Configured {
        state,
        billing,
        addr: env("TOKEN_BILLING_ADDR").unwrap_or_else(|| DEFAULT_ADDR.to_owned()),
        description,
        warnings,
        alert_webhook,
    })
}
