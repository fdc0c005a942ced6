//! `ferry dev broker`: the embedded broker as a standing process.

use tokio::net::{TcpListener, TcpStream};

use crate::embedded::EmbeddedBroker;

pub async fn broker(port: Option<u16>, topics: &[String]) -> i32 {
    if let Err(e) = crate::telemetry::init_logging("warn", false) {
        eprintln!("error: {e}");
        return crate::config::EXIT_CONFIG;
    }
    let broker = match EmbeddedBroker::start(1) {
        Ok(b) => b,
        Err(e) => return super::fail("cannot start the embedded broker", &e.into()),
    };
    for spec in topics {
        let (name, partitions) = match spec.split_once(':') {
            Some((n, p)) => match p.parse::<i32>() {
                Ok(p) if p > 0 => (n, p),
                _ => {
                    eprintln!(
                        "error: --topic {spec}: the partition count must be a positive number, as in orders:3"
                    );
                    return 2;
                }
            },
            None => (spec.as_str(), 1),
        };
        if let Some(why) = crate::config::topic_name_problem(name) {
            eprintln!("error: --topic {spec}: {why}");
            return 2;
        }
        if let Err(e) = broker.create_topic(name, partitions) {
            return super::fail(&format!("cannot create topic {name}"), &e.into());
        }
        println!(
            "topic {name} ({partitions} partition{})",
            if partitions == 1 { "" } else { "s" }
        );
    }
    let mut address = broker.bootstrap_servers().to_string();
    if let Some(port) = port {
        // The mock broker picks its own port; forward a fixed one to it. Clients bootstrap here
        // and are then told the broker's own loopback address, which they reach directly.
        let listener = match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => return super::fail(&format!("cannot listen on 127.0.0.1:{port}"), &e.into()),
        };
        let target = address.split(',').next().unwrap_or_default().to_string();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        address = format!("127.0.0.1:{port}");
    }
    println!("embedded broker listening on {address}");
    println!("use it with: -b {address}   (Ctrl-C stops it; its data lives in memory)");
    let _ = tokio::signal::ctrl_c().await;
    drop(broker);
    0
}
