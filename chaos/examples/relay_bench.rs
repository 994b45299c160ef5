//! Speed of the fault-injecting relay on loopback: round-trip latency direct
//! vs through a clean relay, forwarding throughput, and the pure shaper's
//! cost per datagram. Prints a table of medians.
//!
//! `cargo run --release -p chaos --example relay_bench`

use std::time::{Duration, Instant};

use chaos::link::{LinkFaults, Relay, RelayConfig, Shaper};
use tokio::net::UdpSocket;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn rtt(client: &UdpSocket, to: std::net::SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 2048];
    for i in 0..n {
        let t = Instant::now();
        client.send_to(&(i as u64).to_be_bytes(), to).await?;
        tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf)).await??;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

async fn echo_server() -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = s.local_addr()?;
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            if s.send_to(&buf[..n], from).await.is_err() {
                break;
            }
        }
    });
    Ok((addr, task))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let (echo, echo_task) = echo_server().await?;
    let relay = Relay::spawn(RelayConfig::proxy("127.0.0.1:0".parse()?, echo, 1)).await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    // Warm up.
    rtt(&client, echo, 200).await?;
    rtt(&client, relay.a_side(), 200).await?;
    let direct = median(rtt(&client, echo, 2000).await?);
    let relayed = median(rtt(&client, relay.a_side(), 2000).await?);

    // Throughput: windows of 32 datagrams of 1200 bytes in flight, echoed back.
    let mut rates = Vec::new();
    for _ in 0..5 {
        let n = 20_000usize;
        let payload = [7u8; 1200];
        let mut buf = [0u8; 2048];
        let t = Instant::now();
        let mut received = 0usize;
        let mut sent = 0usize;
        while received < n {
            while sent < n && sent - received < 32 {
                client.send_to(&payload, relay.a_side()).await?;
                sent += 1;
            }
            match tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buf)).await
            {
                Ok(r) => {
                    r?;
                    received += 1;
                }
                // A datagram lost to a full socket buffer: count it and go on.
                Err(_) => received += 1,
            }
        }
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    let rate = median(rates);

    // Pure shaper cost with every fault on.
    let mut costs = Vec::new();
    for seed in 0..5 {
        let mut s = Shaper::new(seed);
        s.set_faults(LinkFaults {
            loss: 0.1,
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(2),
            duplicate: 0.1,
            reorder: 0.1,
            bandwidth: Some(1_000_000_000),
            ..LinkFaults::default()
        });
        let n = 200_000u32;
        let t0 = Instant::now();
        let data = [0u8; 1200];
        for i in 0..n {
            let now = t0 + Duration::from_micros(u64::from(i));
            s.handle_datagram(now, &data);
            while s.poll_transmit(now).is_some() {}
        }
        costs.push(t0.elapsed().as_secs_f64() * 1e9 / f64::from(n));
    }
    let cost = median(costs);

    println!("| measure | median |");
    println!("|---|---|");
    println!("| UDP round trip, direct | {direct:.1} us |");
    println!("| UDP round trip, through a clean relay (both ways) | {relayed:.1} us |");
    println!(
        "| added by the relay per round trip | {:.1} us |",
        relayed - direct
    );
    println!(
        "| relay throughput, 1200 B datagrams, 32 in flight, echoed | {rate:.0} datagrams/s ({:.1} MB/s each way) |",
        rate * 1200.0 / 1e6
    );
    println!("| shaper cost per datagram, all faults on | {cost:.0} ns |");
    relay.shutdown().await?;
    echo_task.abort();
    Ok(())
}
