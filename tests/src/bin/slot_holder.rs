//! `slot-holder REDIS_URL PREFIX FUNCTION SLOT_TTL_MS`: a process that holds one concurrency
//! slot until it is killed.
//!
//! It takes a slot of FUNCTION with reserved concurrency 1, prints `acquired ID EXPIRES_AT_MS`,
//! then renews the slot every third of the TTL, printing `renewed EXPIRES_AT_MS` each time
//! (expiries are milliseconds on the Redis clock). The counting tests SIGKILL it to check that
//! a crashed holder's slot comes back once its TTL has passed.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use sluice_leasing::{ConcurrencyCounter, FunctionLimit};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, prefix, function, ttl_ms] = args.as_slice() else {
        anyhow::bail!("usage: slot-holder REDIS_URL PREFIX FUNCTION SLOT_TTL_MS");
    };
    let ttl = Duration::from_millis(ttl_ms.parse().context("SLOT_TTL_MS must be an integer")?);
    let conn = sluice_leasing::connect(url).await?;
    let counter = ConcurrencyCounter::new(conn, prefix.as_str(), ttl)?;
    let mut slot = counter
        .acquire(function, FunctionLimit::Reserved(1))
        .await
        .context("acquire the slot")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "acquired {} {}", slot.id(), slot.expires_at_ms())?;
    out.flush()?;
    loop {
        tokio::time::sleep(ttl / 3).await;
        slot.renew().await.context("renew the slot")?;
        writeln!(out, "renewed {}", slot.expires_at_ms())?;
        out.flush()?;
    }
}
