//! The smol HTTP example (hyper on smol, async mode), end to end over real HTTP.
#![cfg(all(feature = "async-io", not(feature = "sync")))]

mod common;
mod http;

// The example's own code, minus its `main`: the test runs the server in-process on a
// free port and keeps a handle on its store.
#[allow(dead_code)]
#[path = "../examples/http_smol.rs"]
mod example;

/// Runs `app` on a thread of its own while `check` drives it, then stops it.
fn serving(app: example::App, check: impl FnOnce(std::net::SocketAddr)) {
    let addr = app.local_addr().expect("bound");
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let server = std::thread::spawn(move || {
        smol::block_on(app.run(async move {
            let _ = stopped.recv().await;
        }))
    });
    check(addr);
    stop.send_blocking(())
        .expect("the server listens for the stop");
    server
        .join()
        .expect("the server thread")
        .expect("the server stops cleanly");
}

#[test]
fn serves_sessions_over_http_on_every_store() {
    http::each_store("http-smol", |store| {
        let app = smol::block_on(example::App::bind("127.0.0.1:0", store.clone())).expect("binds");
        serving(app, |addr| {
            http::check_server(addr, &*store);
            http::check_races(addr, &*store);
            http::check_owner_sessions(addr, &*store);
            http::check_hostile_clients(addr);
        });
    });
}

#[cfg(unix)]
#[test]
fn binary_prints_its_address_and_stops_on_ctrl_c() {
    http::check_binary("http_smol");
}

#[test]
fn deletes_expired_sessions_by_itself() {
    let store = portable_sessions::MemoryStore::new();
    let app = smol::block_on(example::App::bind(
        "127.0.0.1:0",
        std::sync::Arc::new(store.clone()),
    ))
    .expect("binds")
    .with_deletion_period(std::time::Duration::from_millis(20));
    serving(app, |_| http::check_deletes_expired(&store));
}
