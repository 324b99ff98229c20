//! Disk miss: what a miss costs with a disk tier next to the same miss without one (issue 15,
//! "disk tier"). Target: with the disk tier, a miss costs at most 1.2x the CPU of the same miss
//! without one. With OUTPOST_BENCH_PREFILL, the disk miss is measured again after the disk tier
//! was filled with that many more objects, so its cost at ~10k and at 1M stored objects can be
//! compared (it should be flat).
//!
//! Run: `cargo bench --bench disk_miss` (release; ~30 s), and
//! `OUTPOST_BENCH_PREFILL=1000000 cargo bench --bench disk_miss` for the flat cases (the
//! prefill runs at the disk edge's miss rate: up to tens of minutes for 1M objects). Settings:
//! OUTPOST_BENCH_SECS (measured seconds per case per round, 3), OUTPOST_BENCH_WARMUP_SECS (1),
//! OUTPOST_BENCH_ROUNDS (3), OUTPOST_BENCH_CONNS (16), OUTPOST_BENCH_PREFILL (objects added to
//! the disk edge before the "flat" cases; 0: no flat cases), OUTPOST_BENCH_FILL_CONNS
//! (connections of the prefill, 64), OUTPOST_BENCH_MEMORY_MIB (`--memory` of both edges, 256: its disk index holds ~180,000 1 KiB
//! objects, a quarter of it at ~320 bytes each; the flat run at 1M objects needs 1792 to stay
//! under the index's capacity: at 1536 it holds ~1.1M and the flat cases evict with every
//! miss),
//! OUTPOST_BENCH_DISK_GIB (`--disk`, 16), OUTPOST_BENCH_TMPDIR (where the cache directory goes;
//! default target/tmp, on the build's disk), OUTPOST_BENCH_SERVER_THREADS (edge runtime
//! workers; cores), OUTPOST_BENCH_CLIENT_THREADS (2), OUTPOST_BENCH_ORIGIN_THREADS (1).
//! Positional arguments filter cases by name (`-- disk`; the ratios need both; `=name` matches
//! one case exactly: the flat run at `OUTPOST_BENCH_MEMORY_MIB=1792` takes `-- =disk =disk/flat
//! =disk-hit/flat`, as its memory tier then answers the "disk-hit" case's recent URLs). `cargo test
//! --benches` or `cargo bench --bench disk_miss -- --test` only does a short smoke run (a
//! prefill of 200 objects included).
//!
//! Setup: one process, three tokio runtimes: the edges' (workers named `edge-worker-N`, blocking
//! pool `edge-blocking`, at most 32 blocking threads as `outpost` runs), the origin's
//! (`bench-origin`) and the load generator's (`bench-client`). The origin is a hyper HTTP/1
//! server on 127.0.0.1 answering any path with 1 KiB (the path's bytes, then a fixed pattern:
//! no two URLs share a body, so content-addressed storage cannot deduplicate them),
//! `Cache-Control: public, max-age=31536000`, `application/octet-stream` (never compressed). Two
//! `EdgeServer`s in front of it through their own upstream client (keep-alive): "memory" (memory
//! tier only) and "disk" (the same plus `--cache-dir` in a temp dir and `--disk 16GiB`), both
//! `--memory 256MiB`. Closed loop: each of 16 keep-alive connections (benches/support/client.rs)
//! sends its next GET for a URL never asked before when the previous answer is read; every
//! answer must be a 200 `X-Cache: MISS` of 1024 bytes or the bench fails. Cases alternate
//! within each round (memory, disk, memory, disk, …). After each disk case the bench waits until
//! the disk tier has decided on every miss it was sent (the `disk_admissions` counters of
//! `/stats` on the edge's admin port add up to the misses sent), prints them, and counts any
//! CPU spent meanwhile (disk work that lags the responses is part of the miss's cost); the
//! bench fails if they never add up. Prefill: OUTPOST_BENCH_PREFILL unique misses over 64
//! connections to the disk edge, then the same wait; then rounds of "memory/flat" and
//! "disk/flat" alternate as before.
//!
//! Disk hits ("disk-hit", and "disk-hit/flat" after the prefill): after the disk case of each
//! round, the disk edge is asked, once each, for the URLs it stored as misses the round before
//! (this round's in the first round), or for the prefilled URLs (oldest first): every answer
//! must be a 200 `X-Cache: HIT` of 1024 bytes. Such a first hit finds the object on disk with
//! its metadata not held (a record read and parsed) and promotes it to memory, the long tail's
//! hit. The bench prints how many of them the disk tier answered (the edge's
//! `outpost_requests_total{cache="hit",tier="disk"}`); a run that asked every stored URL ends
//! early and says so.
//!
//! Columns: req/s (median of rounds), latency percentiles over all rounds, "disk objects" =
//! objects in the disk tier after the case (from `/stats`), "rt CPU/req" = CPU time of the edge
//! runtime's worker threads per request (/proc schedstat, warm-up included), "other CPU/req" =
//! CPU of every other thread of the process that is neither the load generator, the origin nor
//! the main thread (the blocking pool, disk writers; whole-process CPU from /proc/self/stat,
//! exited threads included, minus those), "CPU/req" = the sum; "req/s vs memory" and "CPU vs
//! memory" = the disk case over the memory case of the same round (median of rounds): the
//! target is CPU vs memory ≤ 1.20x. Client, origin and edges share the cores, so req/s moves
//! with the machine's load more than CPU/req does.
//!
//! Numbers: 2 cores / 24 GiB, 2026-12-05, nothing else running, `cargo bench --bench disk_miss`
//! (3 rounds of 3 s), before = d35198b (a JSON metadata file per object beside its cacache
//! content file, each step a tokio::fs hop), after = the redb index (metadata group-committed,
//! bodies up to 16 KiB inline in their record); each built from its own tree, two runs each,
//! alternating:
//!
//! | build  | run | memory CPU/req | disk CPU/req (runtime + other) | disk req/s | CPU vs memory |
//! |--------|-----|---------------:|-------------------------------:|-----------:|--------------:|
//! | before | 1   |        91.8 µs |          413.6 µs (213 + 191)  |      4 268 |         4.45x |
//! | after  | 1   |        76.0 µs |          179.6 µs (123 + 57)   |      7 199 |         2.29x |
//! | before | 2   |        61.7 µs |         1381.6 µs (182 + 1199) |      1 319 |        22.40x |
//! | after  | 2   |        66.1 µs |          180.7 µs (124 + 56)   |      7 390 |         2.74x |
//!
//! Before, most of the cost was the kernel's: ext4 allocating an inode for each temporary file
//! and each new cacache directory (slow while many inodes were recently freed, as in run 2,
//! after run 1's directory was deleted), and cross-directory renames, which the file system
//! serialises. After, a 1 KiB miss writes no file: the cost is the index's (its writer thread,
//! ~55 µs per object: a B-tree insert of a ~3 KB record, synced in group commits) and the
//! runtime's share (encoding the record, the hand-offs). Target (≤ 1.2x) not met: 2.3-2.7x.
//!
//! Flat (`OUTPOST_BENCH_PREFILL=1000000`, 40184a6, same day): the prefill ran at 4 984
//! misses/s (200.6 s); then, against the same case at 87 600 objects:
//!
//! | case      | disk objects | req/s | rt CPU/req | other CPU/req | CPU/req | CPU vs memory |
//! |-----------|-------------:|------:|-----------:|--------------:|--------:|--------------:|
//! | disk      |       87 600 | 7 051 |   124.9 µs |       57.3 µs | 173.1 µs |        2.63x |
//! | disk/flat |    1 144 499 | 4 702 |   121.1 µs |      113.6 µs | 236.9 µs |        3.41x |
//!
//! Not flat (+37%, target ≤ 20%): the index writer's share doubles. Records of ~3 KB take a
//! B-tree leaf page each, so at a million objects the tree's upper pages (~40 MB) no longer fit
//! the index's page cache (1/16 of `--memory`: 4 MiB here) and each insert reads its path from
//! the OS page cache.
//!
//! Session 10 (2026-12-05): records keyed by commit sequence (appended to the rightmost leaf,
//! a36a93b), small bodies stored from the fill's own whole copy without a writer task, their
//! metadata not held for a first disk hit. 6 rounds at a36a93b:
//!
//! | case   | disk objects | req/s  | rt CPU/req | other CPU/req | CPU/req  | CPU vs memory |
//! |--------|-------------:|-------:|-----------:|--------------:|---------:|--------------:|
//! | memory |            - | 20 344 |    68.4 µs |        0.0 µs |  68.4 µs |               |
//! | disk   |      242 917 |  9 891 |   113.0 µs |       32.6 µs | 142.5 µs |         2.08x |
//!
//! At 34923b3 (the session's start) the same run gave 194.0 µs (134.1 + 59.9) against 94.4 µs:
//! 2.52x. The index writer's share halved (~60 to ~30 µs). Target (≤ 1.2x) still not met.
//! Measured on the way (same harness, experiment code not kept): with the commit skipped
//! (record built, nothing queued) the disk miss cost the memory miss's CPU within noise
//! (1.00-1.07x); with the fill not waiting for its commit (a spawned task commits) nothing
//! changed (1.64-1.79x against 1.96-2.00x in alternating runs, inside the spread). What is left
//! is the writer's own work (~30 µs: a random-leaf insert into `entries` per object, ~18-25 µs
//! in the scratch harness at 35 per commit) and what it costs the runtime to share two cores
//! with it (the runtime's extra ~45 µs goes to allocator and copy symbols spread thin, perf).
//! A longer gather (20 ms instead of 5) made it worse (rt 118-136 µs). Next: keep the key
//! index out of the per-commit path (entries batched into rare commits, records self-describing
//! so a crash replays the tail), or an ATS-style log.
//!
//! Then (001fdbd) a put learns the entry it replaces from the insert (no lookup first), and
//! (3eb1c7e) a small copy's commit is reported by a completion on the writer thread instead of
//! waking a task per object: that wake cost the runtime ~20 µs per miss (alternating 3-round
//! runs: 118.2 and 104.8 µs against 136.6 and 125.3 µs). Final, 6 rounds at 3eb1c7e:
//!
//! | case     | disk objects | req/s  | rt CPU/req | other CPU/req | CPU/req  | CPU vs memory |
//! |----------|-------------:|-------:|-----------:|--------------:|---------:|--------------:|
//! | memory   |            - | 18 533 |    76.9 µs |        0.0 µs |  76.9 µs |               |
//! | disk     |      275 484 | 12 032 |    96.7 µs |       33.4 µs | 130.9 µs |         1.63x |
//! | disk-hit |      275 484 | 24 790 |    52.1 µs |       15.0 µs |  67.1 µs |               |
//!
//! The first round (~40 000 objects) was at 1.24x (95.7 against 76.9 µs), the last (275 000)
//! at 1.53x: the writer's share grows with the store (18.5 to 34 µs), and the runtime's with
//! it. Target (≤ 1.2x) not met. Session's start: 2.52x.
//! One 3-round run at e2e42b5 (streamed copies indexed by the writer thread too): 108.4 µs
//! (82.6 + 25.2) against 72.4 µs, 1.51x; first disk hits 60.7 µs.
//!
//! Flat, final (3eb1c7e; the prefill ran at 10 844 misses/s):
//!
//! | case          | disk objects | req/s  | rt CPU/req | other CPU/req | CPU/req  |
//! |---------------|-------------:|-------:|-----------:|--------------:|---------:|
//! | disk          |      123 286 | 10 001 |   106.4 µs |       28.7 µs | 135.5 µs |
//! | disk/flat     |    1 235 997 | 10 117 |   100.1 µs |       45.6 µs | 145.7 µs |
//! | disk-hit      |      123 286 | 23 939 |    54.0 µs |       16.1 µs |  70.1 µs |
//! | disk-hit/flat |    1 235 997 | 19 747 |    62.4 µs |       19.4 µs |  81.7 µs |
//!
//! Misses +7.5% in CPU (req/s +1%), first disk hits +17% (req/s -18%): within the target's 20%.
//!
//! Flat, earlier the same day at 836dd74 and a763632 (the prefill ran at 8 318 misses/s; 4 984
//! before):
//!
//! | case          | disk objects | req/s  | rt CPU/req | other CPU/req | CPU/req  |
//! |---------------|-------------:|-------:|-----------:|--------------:|---------:|
//! | disk (run 1)  |      113 145 |  9 545 |   122.8 µs |       32.4 µs | 154.0 µs |
//! | disk/flat     |    1 212 890 |  8 630 |   108.4 µs |       45.4 µs | 153.8 µs |
//! | disk (run 2)  |      124 866 | 10 484 |   109.3 µs |       27.6 µs | 134.3 µs |
//! | disk/flat     |    1 222 968 |  8 136 |   120.9 µs |       48.2 µs | 169.0 µs |
//! | disk-hit      |      124 866 | 25 752 |    48.0 µs |       14.1 µs |  61.9 µs |
//! | disk-hit/flat |    1 222 968 | 23 290 |    52.0 µs |       15.5 µs |  67.5 µs |
//!
//! Misses: +0% and +26% in CPU, -10% and -22% in req/s (target ≤ 20%; before +37%). The
//! writer's share still grows with the store (27-32 to 45-48 µs: `entries` leaves no longer
//! in the index's cache); the runtime's share moves with the machine. First disk hits: +9%,
//! every one answered by the disk tier.
//!
//! Session 11 (2026-12-05): the disk index counts against `--memory` (a quarter of it); the
//! default `--memory` here went from 64 to 256 MiB so the index holds what 3 rounds store
//! (~150,000 objects). At 64 MiB it holds ~52,000: the first round already evicts, and the
//! disk-hit case fails on objects evicted before it asks. 3 rounds, both builds at 256 MiB,
//! alternating: e2e42b5 (session 10) 109.2 µs (85.2 + 24.1) against 68.3 µs, 1.63x; 6d65775
//! 102.5 µs (81.0 + 21.4) against 68.1 µs, 1.57x. First disk hits 64.1 and 59.5 µs. Unchanged
//! within the runs' spread: the index accounting adds two atomic adds per stored object.
//!
//! Session 12 (2026-12-05): index writes go to a journal folded into the key table in batches
//! (a3187aa, then folds by sixteenths of the key space and a journal sized by memory). 3
//! rounds, alternating s11 = fe96a32 and s12 = a3187aa, three runs each (disk CPU/req as
//! runtime + other; CPU vs memory):
//!
//! | run | s11 memory | s11 disk | s11 ratio | s12 memory | s12 disk | s12 ratio |
//! |---|---:|---:|---:|---:|---:|---:|
//! | 1 | 71.7 µs | 115.4 µs (89.9 + 25.5) | 1.53x | 87.7 µs | 107.9 µs (90.6 + 17.2) | 1.24x |
//! | 2 | 66.0 µs | 105.5 µs (80.2 + 22.8) | 1.42x | 57.6 µs | 84.4 µs (72.2 + 12.2) | 1.47x |
//! | 3 | 65.0 µs | 99.9 µs (79.1 + 20.8) | 1.55x | 85.7 µs | 105.9 µs (91.6 + 14.3) | 1.29x |
//!
//! The index writer's share ("other") fell from 21-26 to 12-17 µs; disk misses' p99 from
//! 3.8-4.4 to 2.5-3.3 ms. The memory case moved from 58 to 88 µs between runs of the same
//! code, so the ratio is 1.24-1.47x (target ≤ 1.2x: not met). What is left of the writer's
//! share is mostly per commit, not per object: measured in the store (200,000 puts of a 1.4
//! KB record), 17.7 µs per put at 64 per commit and 45.8 at 16, i.e. ~600 µs per commit, of
//! which the synced two-phase commit (quick repair needs it) is ~300 µs on this VM.
//!
//! Flat, with `OUTPOST_BENCH_PREFILL=1000000 OUTPOST_BENCH_MEMORY_MIB=1792 -- =disk =disk/flat
//! =disk-hit/flat` (the index holds 1,280,000 objects: nothing is evicted), 2 rounds (the
//! prefill ran at 14 547 misses/s; 10 844 in session 10):
//!
//! | case | disk objects | req/s | rt CPU/req | other CPU/req | CPU/req |
//! |---|---:|---:|---:|---:|---:|
//! | disk, round 1 | 66 364 | 16 711 | 74.4 µs | 11.2 µs | 85.6 µs |
//! | disk, round 2 | 126 058 | 14 837 | 85.3 µs | 11.1 µs | 96.4 µs |
//! | disk/flat, round 1 | 1 179 428 | 12 916 | 81.2 µs | 28.7 µs | 109.9 µs |
//! | disk/flat, round 2 | 1 231 267 | 12 817 | 83.2 µs | 29.6 µs | 112.8 µs |
//! | disk-hit/flat | 1 231 267 | 21 693-23 299 | 55.2-58.0 µs | 14.8-15.5 µs | 70.0-73.5 µs |
//!
//! Misses +17% (median rounds; +28% round against round 1): within the target's 20%, barely;
//! the writer's share grows with the store (11 to 29 µs: a fold rewrites more leaves). Two
//! more runs of that build (8a2db2d) and two of aa19d22 (the journal keyed by range first)
//! spread widely, the runtime's share as much as the writer's: medians 101.0 → 133.7 µs
//! (+32%) and 108.5 → 139.0 (+28%), 100.4 → 132.7 (+32%) at aa19d22; single rounds from +1%
//! to +46%. Target (≤ 20%): not reliably met. With
//! the journal capped at 65,536 words and folded whole (a3187aa, `--memory 1536MiB`), 91.5
//! against 115.8 and 141.5 µs: +27% and +55%. At 1536 MiB with the journal sized by memory,
//! the index filled at 1,101,056 objects and every miss also evicted: 138.1 µs.
//!
//! Session 13 (2026-12-05): index commits between syncs left to the OS (`Durability::None`,
//! synced every 50 ms or when writes pause; an object counts as stored at the sync), folds
//! that take a key range's words out of the journal in one sweep, and records checked with
//! xxh3-128 (inline fill bodies named by it) instead of blake3 (and sha256). 3 rounds,
//! alternating s12 = aa19d22 and s13 = 999ed07, three runs each (disk CPU/req as runtime +
//! other):
//!
//! | run | s12 memory | s12 disk | s12 ratio | s13 memory | s13 disk | s13 ratio |
//! |---|---:|---:|---:|---:|---:|---:|
//! | 1 | 69.2 µs | 102.3 µs (86.2 + 17.6) | 1.48x | 72.8 µs | 96.5 µs (83.2 + 14.4) | 1.30x |
//! | 2 | 62.5 µs | 93.9 µs (78.8 + 17.0) | 1.53x | 61.3 µs | 87.6 µs (74.4 + 13.2) | 1.44x |
//! | 3 | 69.5 µs | 102.5 µs (82.4 + 20.0) | 1.48x | 58.4 µs | 82.7 µs (69.7 + 12.3) | 1.43x |
//!
//! The writer's share fell from 17-20 to 12-14 µs. Target (≤ 1.2x): not met (1.30-1.44x);
//! the memory case itself moves 58-85 µs between runs of one build.
//!
//! Flat (`OUTPOST_BENCH_PREFILL=1000000 OUTPOST_BENCH_MEMORY_MIB=1792 -- =disk =disk/flat
//! =disk-hit/flat`, 3 rounds), medians of rounds:
//!
//! | build | disk (~170,000 objects) | disk/flat (1,284,568) | change | disk-hit/flat |
//! |---|---:|---:|---:|---:|
//! | aa19d22 | 90.1 µs | 114.0 µs | +27% | 73.4 µs |
//! | 93828cf | 93.4 µs | 99.6 µs | +7% | 69.8 µs |
//! | 999ed07 | 98.9 µs | 99.1 µs | +0% | 67.9 µs |
//!
//! Target (≤ 20%): met in both runs of this session's builds. The writer's share still grows
//! (13-15 µs small, 17-30 µs flat, rising as folds start). A fold of ~40,000 words into
//! ~300,000 entries took ~200 ms, 135-155 ms of it removing the words from the journal one by
//! one in key order; in one sweep, 35-54 ms.
//!
//! Session 14 (2026-12-05): records with MessagePack metadata instead of JSON (~470 bytes
//! instead of ~960 for this bench's response; 5fe2c04, e70da92). 3 rounds, alternating
//! s13 = 999ed07 and s14 = 5fe2c04, two runs each: memory 67.9, 70.6 µs -> 67.7, 87.2 µs; disk
//! 92.5 (78.8 + 14.2), 113.9 (100.3 + 14.2) µs -> 92.7 (77.8 + 14.9), 95.9 (80.3 + 14.4) µs;
//! ratio 1.44, 1.65x -> 1.42, 1.08x. No change here: this bench's records (few response
//! headers) already fit two to a 4 KiB page. Behind a real `outpost edge` (unique 1 KiB
//! misses from wrk, 64 connections, `outpost origin`'s headers), where JSON records did not,
//! the writer thread took 22.7-24.9 µs per miss before and 17.9-21.0 after (two runs each,
//! alternating), and the index file grew half as fast; see also `benches/vs_nginx.sh`.
//! Flat, two pairs run the same day, alternating: s13 +23% (89.5 -> 109.7 µs) and +28% (87.3
//! -> 112.0 µs); s14 +33% (86.6 -> 115.2 µs) and +20% (86.8 -> 104.4 µs); disk-hit/flat 73.0,
//! 74.5 µs -> 69.6, 65.6 µs. The same s13 binary measured +0% and +7% the day before: on
//! this machine, this day, the flat target (≤ 20%) is not met by either build.
//!
//! Session 15 (2026-12-05): durable commits every 250 ms instead of 50 (not taken; the
//! store's `SYNC_EVERY` says why). 3 rounds, alternating with 92a1901: disk 113.4 (writer
//! 17.6), 96.2 (15.7) µs at 50 ms against 101.0 (14.2), 88.7 (13.7) µs at 250 ms; flat, the
//! writer at 1.2M objects took 19.9 and 25.8 µs per miss at 50 ms against 28.3 and 28.5 µs at
//! 250 ms (disk -> disk/flat: 100.6 -> 101.9 µs, +1%, and 88.9 -> 106.9 µs, +20%, at 50 ms;
//! 82.9 -> 109.2, +32%, and 85.1 -> 110.3 µs, +30%, at 250 ms). The build as committed
//! (76828bc: the policy's copy of the response cut to the fields it decides on; this bench's
//! response has few headers, so its records keep their size), alternating twice with
//! 92a1901: memory 64.7, 63.1 µs and disk 89.2 (writer 14.0), 88.1 (14.3) µs, 1.38x and 1.40x,
//! against memory 66.7, 62.7 µs and disk 97.7 (14.2), 85.9 (13.4) µs, 1.39x and 1.31x.
//! Its flat run: disk 90.9 µs (writer 13.6) at 174,941 objects, disk/flat 102.4 µs (22.1) at
//! 1,284,568: +13%; disk-hit/flat 68.1 µs.
//!
//! Session 16 (2026-12-06): where a disk miss's extra CPU goes (perf, frame pointers, one
//! 6 s round of each case): the index writer thread ~15 µs per miss (B-tree inserts ~6.6:
//! the record ~4.4, the journal word ~2.2; the commit ~4.8: page writes ~2, checksums and
//! allocator, fdatasync ~0.7), and the runtime's `store_whole` ~6 µs (MessagePack ~2, the
//! content hash formatted to text and parsed back twice ~2.2: now kept binary, 873df74).
//! The upper bound of moving records out of redb into a log of their own (ATS-style),
//! measured by skipping the records insert (experiment, not kept; same binary, alternating
//! twice): the writer's share fell from 16.8 and 15.0 to 10.8 and 9.4 µs, the ratio from
//! 1.47 and 1.36x to 1.36 and 1.14x. A log of records alone would not reliably meet 1.2x:
//! the journal's insert and the commit would remain. Final build (8350b83) against a76e7d3,
//! 3 rounds, alternating: disk CPU/req 123.5, 147.6, 137.2, 135.0 µs (ratio 1.32, 1.49,
//! 1.36, 1.23x) against 130.1, 123.8, 137.5 µs (1.38, 1.21, 1.40x): within the runs'
//! spread (this evening's memory case ran 92-111 µs, against 59-75 µs in the afternoon).
//! Target (≤ 1.2x): not met.
//!
//! Session 17 (2026-12-06): perf again (one 6 s round, frame pointers): the writer ~16.7 µs
//! per miss, of which the records insert ~4.6 (redb allocating a page per leaf split and
//! caching it zeroed), the journal word ~2.8, the commit ~5.5 (page writes ~2.3, checksums
//! ~1.4, sync ~0.8), replies and bookkeeping ~2.2, the loop ~1.5; the runtime's record
//! encoding ~1.8 µs (MessagePack of `CachePolicy`'s header maps). Commits at least 20 ms apart
//! instead of 5 (`GATHER`; experiment, not kept), alternating twice against 8350b83: 1.21,
//! 1.29x against 1.21, 1.26x, the writer's share 14.0 and 14.3 µs against 12.4 and 14.1 µs:
//! no gain; the cost is per record, not per commit. Final build (5ff3d93) against 8350b83,
//! alternating twice: 1.26 and 1.25x (disk 90.3 and 94.5 µs) against 1.38 and 1.40x (102.6
//! and 106.8 µs); this session changed nothing on a unique miss's path that would explain it
//! (the earlier pair had the base at 1.21 and 1.26x). Target (≤ 1.2x): not met. Flat, at
//! 5ff3d93 (`OUTPOST_BENCH_PREFILL=1000000`, 3 rounds): at `OUTPOST_BENCH_MEMORY_MIB=1792`
//! (1.28M objects, under capacity) disk/flat 107.0 µs against disk 97.9 µs at ~190,000, +9%
//! (target ≤ 20%: met; the writer's share rose 19 → 25 → 34 µs over the rounds as the journal
//! filled toward its fold); disk-hit/flat 58.1 µs. At 1536 MiB the index was full (1.1M
//! objects) and each miss also evicted one: 132.8 against 102.6 µs, +29%, all of it the
//! writer (15.6 → 39.0 µs: an eviction's conditional delete and its journal word per miss).
//!
//! Session 18 (2026-12-06): admission to a full tier (a2e01e3: a new key is written on its
//! second miss once the index has no room; `cache.disk_admission`). OUTPOST_BENCH_DISK_ADMISSION
//! sets the disk edge's policy. The tier full from the first round (`OUTPOST_BENCH_MEMORY_MIB=32`:
//! ~22,500 objects; `-- =memory =disk`, 3 rounds): with `always`, every miss written and one
//! evicted, 1.40x the memory-only miss (99.7 µs: the writer 24 µs per miss, 0.66x its req/s);
//! with the default, the unique misses of rounds 2 and 3 all `rejected`, 1.06x (75.2 µs, 0.98x
//! its req/s; the memory case ran 70-78 µs in both). Under capacity nothing changes: against
//! session 17's final build, alternating twice, 1.24 and 1.42x against 1.30 and 1.35x (disk
//! 99.0 and 109.2 µs against 99.1 and 98.3); at `OUTPOST_BENCH_MEMORY_MIB=512`, 1.23 and 1.36x
//! against 1.30 and 1.18x. Target (≤ 1.2x): not met; the runs spread over 1.18-1.42x. This
//! machine now runs the default settings at ~15,000 disk misses a second, so the third round
//! nears the index's capacity (~180,000 objects at 256 MiB): runs that compare under-capacity
//! misses take `OUTPOST_BENCH_MEMORY_MIB=512` (~360,000).
//!
//! Session 20 (2026-12-06): the index writer recovers from a latched I/O error (it keeps the
//! deletes since the last durable commit to apply them again: one push per delete; a unique
//! miss has none). `OUTPOST_BENCH_MEMORY_MIB=512 -- =memory =disk`, 3 rounds, alternating twice
//! against 399cf97 (session 19's final build), medians of rounds: disk 106.8 and 117.4 µs
//! (writer 16.8 and 17.5) against memory 91.5 and 87.6 µs, "CPU vs memory" (the median of the
//! rounds' own ratios) 1.33 and 1.33x; before, 114.2 and 90.6 µs (writer 17.1 and 12.9) against
//! 85.6 and 67.1 µs, 1.26 and 1.29x (the memory case moved 67-91 µs between runs).
//! No change beyond the spread. Target (<= 1.2x): not met. perf (frame pointers, one 6 s round):
//! the runtime's own disk work is ~4 µs per miss (`store_whole` 3.4% of the workers' samples,
//! MessagePack of the metadata 1.5%); the rest of its extra is sharing two cores with the
//! writer (context switches ~4 µs) and allocations. The writer's B-tree work is what is left.
//!
//! Session 21 (2026-12-06): how far a log of records of its own (ATS-style, the redesign the
//! store's docs name) could take the target, measured as its upper bound: the same binary
//! (bc638c9 plus a switch that skips the `records` insert; experiment, not kept),
//! `OUTPOST_BENCH_MEMORY_MIB=512 -- =memory =disk`, 3 rounds, five runs of each, alternating
//! (CPU vs memory, the median of the rounds' ratios; the writer's CPU per miss):
//!
//! | run | as built | writer | records insert skipped | writer |
//! |---|---:|---:|---:|---:|
//! | 1 | 1.34x | 16.0 µs | 1.19x | 7.8 µs |
//! | 2 | 1.31x | 14.0 µs | 1.26x | 9.3 µs |
//! | 3 | 1.54x | 16.1 µs | 1.29x | 8.1 µs |
//! | 4 | 1.31x | 15.9 µs | 1.25x | 6.6 µs |
//! | 5 | 1.34x | 11.6 µs | 1.19x | 8.2 µs |
//!
//! A record that costs nothing to store would halve the writer's share and leave the miss at
//! 1.19-1.29x (median 1.25x, against 1.34x as built): not reliably within 1.2x, so the
//! multi-session rewrite a log with its own space reclamation needs was not started. Skipping
//! the journal's insert as well is not a clean measure (the folds then find nothing and the
//! store stops at its first fold), so it is not reported. perf of a memory and a disk round
//! (frame pointers, 6 s each): the workers' extra is spread thin (the record's encoding,
//! hashing and hand-off ~2.5 µs; allocator ~1.5 µs); the runtime's extra moved 2.5-14 µs
//! between runs of one build.

mod support;

#[global_allocator]
static GLOBAL: outpost_alloc::MiMalloc = outpost_alloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::client::XCache;
use support::disk::{
    InProcessEdge, Origin, Until, disk_state, http_get, process_cpu, temp_dir, tids_cpu,
    tids_named, unique_gets, unique_misses, wait_settled,
};
use support::{Latencies, env_secs, env_u64, fmt_dur, median};

/// Body length of every object.
const LEN: usize = 1024;
/// Blocking threads of the edges' runtime, as `outpost` sets it (src/main.rs).
const MAX_BLOCKING: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Disk,
    /// Hits on objects the disk edge stored earlier (see the module docs).
    DiskHit,
}

struct Case {
    kind: Kind,
    /// 0: before the prefill; 1: after it (the "flat" cases).
    phase: usize,
    rps: Vec<f64>,
    /// Per round, µs per request: edge runtime workers, other threads.
    rt_us: Vec<f64>,
    other_us: Vec<f64>,
    latencies: Vec<u32>,
    disk_objects: Option<u64>,
}

impl Case {
    fn name(&self) -> &'static str {
        match (self.kind, self.phase) {
            (Kind::Memory, 0) => "memory",
            (Kind::Disk, 0) => "disk",
            (Kind::DiskHit, 0) => "disk-hit",
            (Kind::Memory, _) => "memory/flat",
            (Kind::Disk, _) => "disk/flat",
            (Kind::DiskHit, _) => "disk-hit/flat",
        }
    }

    fn cpu_us(&self) -> Vec<f64> {
        self.rt_us
            .iter()
            .zip(&self.other_us)
            .map(|(a, b)| a + b)
            .collect()
    }
}

struct Settings {
    conns: usize,
    warmup: Duration,
    measure: Duration,
    rounds: u64,
    prefill: u64,
    fill_conns: usize,
    memory: u64,
    disk: u64,
}

/// CPU counters at one moment.
struct Cpu {
    process: Duration,
    edge_rt: Duration,
    /// Load generator, origin and main thread.
    excluded: Duration,
}

fn main() {
    outpost_alloc::tune(); // as `outpost` does
    let smoke = support::smoke_mode();
    let s = if smoke {
        Settings {
            conns: 2,
            warmup: Duration::ZERO,
            measure: Duration::from_millis(200),
            rounds: 1,
            prefill: 200,
            fill_conns: 8,
            memory: 64 << 20,
            disk: 1 << 30,
        }
    } else {
        Settings {
            conns: env_u64("OUTPOST_BENCH_CONNS", 16).max(1) as usize,
            warmup: env_secs("OUTPOST_BENCH_WARMUP_SECS", 1.0),
            measure: env_secs("OUTPOST_BENCH_SECS", 3.0),
            rounds: env_u64("OUTPOST_BENCH_ROUNDS", 3).max(1),
            prefill: env_u64("OUTPOST_BENCH_PREFILL", 0),
            fill_conns: env_u64("OUTPOST_BENCH_FILL_CONNS", 64).max(1) as usize,
            memory: env_u64("OUTPOST_BENCH_MEMORY_MIB", 256) << 20,
            disk: env_u64("OUTPOST_BENCH_DISK_GIB", 16) << 30,
        }
    };
    let filters = support::filters();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let workers = env_u64("OUTPOST_BENCH_SERVER_THREADS", cores).max(1) as usize;
    let made = Arc::new(AtomicUsize::new(0));
    // tokio starts the workers while building the runtime, before anything can use its blocking
    // pool: the first `workers` threads it names are the workers.
    let edge_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(MAX_BLOCKING)
        .thread_name_fn(move || {
            let i = made.fetch_add(1, Ordering::Relaxed);
            if i < workers {
                format!("edge-worker-{i}")
            } else {
                "edge-blocking".to_string()
            }
        })
        .enable_all()
        .build()
        .expect("edge runtime");
    let runtime = |name: &str, threads: u64| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1) as usize)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("tokio runtime")
    };
    let origin_rt = runtime("bench-origin", env_u64("OUTPOST_BENCH_ORIGIN_THREADS", 1));
    let client_rt = runtime("bench-client", env_u64("OUTPOST_BENCH_CLIENT_THREADS", 2));
    let worker_tids = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t = tids_named("edge-worker");
            if t.len() == workers {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "found {} edge worker threads, expected {workers}",
                t.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let main_tid = std::process::id();
    let cpu_now = || -> Option<Cpu> {
        let mut excluded = tids_named("bench-client");
        excluded.extend(tids_named("bench-origin"));
        excluded.push(main_tid);
        Some(Cpu {
            process: process_cpu()?,
            edge_rt: tids_cpu(&worker_tids)?,
            excluded: tids_cpu(&excluded)?,
        })
    };

    let origin = origin_rt.block_on(Origin::start(LEN));
    let dir = temp_dir();
    let cache_dir = dir.path().join("cache");
    let mem_edge = edge_rt.block_on(InProcessEdge::start(origin.addr, s.memory, None));
    let disk_edge = edge_rt.block_on(InProcessEdge::start(
        origin.addr,
        s.memory,
        Some((&cache_dir, s.disk)),
    ));

    let phases = if s.prefill > 0 { 2 } else { 1 };
    let mut cases: Vec<Case> = (0..phases)
        .flat_map(|phase| {
            [Kind::Memory, Kind::Disk, Kind::DiskHit].map(|kind| Case {
                kind,
                phase,
                rps: Vec::new(),
                rt_us: Vec::new(),
                other_us: Vec::new(),
                latencies: Vec::new(),
                disk_objects: None,
            })
        })
        .filter(|c| {
            let name = c.name();
            filters.is_empty()
                || filters.iter().any(|f| match f.strip_prefix('=') {
                    Some(exact) => name == exact,
                    None => name.contains(f.as_str()),
                })
        })
        .collect();
    println!(
        "disk_miss{}: {} KiB unique misses, {} connections, {} round(s) of {} warm-up + {} per \
         case, --memory {} MiB, --disk {} GiB, prefill {}, edge runtime {workers} workers, \
         cache dir {}",
        if smoke { " (smoke run)" } else { "" },
        LEN / 1024,
        s.conns,
        s.rounds,
        fmt_dur(s.warmup),
        fmt_dur(s.measure),
        s.memory >> 20,
        s.disk >> 30,
        s.prefill,
        cache_dir.display(),
    );

    // Storable misses the disk edge was sent (each must end in exactly one admission outcome).
    let mut disk_sent = 0u64;
    let mut mismatches = Vec::new();
    let mut settle = |sent: u64, what: &str, timeout: Duration| {
        let (state, settled, waited) =
            wait_settled(disk_edge.admin, sent, timeout).expect("/stats of the disk edge");
        let check = match state.decided() {
            Some(n) if n == sent => "ok".to_string(),
            Some(n) => {
                mismatches.push(format!("{what}: {n} admission outcomes for {sent} misses"));
                format!("MISMATCH: {n} outcomes for {sent} misses")
            }
            None => "counters not exposed".to_string(),
        };
        let waited = if settled {
            fmt_dur(waited)
        } else {
            format!("gave up after {}", fmt_dur(waited))
        };
        println!(
            "    disk admissions after {what}: {} of {sent} storable misses ({check}; waited {}), \
             disk tier {} objects",
            state.describe(),
            waited,
            state.objects.map_or("?".to_string(), |n| n.to_string()),
        );
        if let Some(a) = &state.admissions {
            let dropped: u64 = a
                .iter()
                .filter(|(k, _)| k.as_str() != "stored")
                .map(|(_, v)| v)
                .sum();
            if dropped > 0 {
                println!(
                    "    note: {dropped} misses were not stored: the disk case did less work \
                     than a stored miss"
                );
            }
        }
        state.objects
    };

    // The disk edge's misses of each round of phase 0 (`/disk/{round}/{n}`, n below the count),
    // and the next prefilled URL not hit yet: the sources of the disk-hit cases.
    let mut disk_round_sent: Vec<u64> = Vec::new();
    let mut next_prefilled = 0u64;
    for phase in 0..phases {
        if phase == 1 {
            let started = Instant::now();
            let run = client_rt
                .block_on(unique_misses(
                    disk_edge.addr,
                    "/prefill/",
                    0,
                    s.fill_conns,
                    Until::Count(s.prefill),
                    LEN as u64,
                ))
                .unwrap_or_else(|e| panic!("prefill: {e}"));
            disk_sent += run.all_requests;
            let misses = started.elapsed();
            println!(
                "  prefill: {} misses in {:.1} s ({:.0}/s)",
                run.all_requests,
                misses.as_secs_f64(),
                run.all_requests as f64 / misses.as_secs_f64().max(1e-9)
            );
            settle(disk_sent, "the prefill", Duration::from_secs(600));
            println!(
                "  prefill done in {:.1} s (disk writes included)",
                started.elapsed().as_secs_f64()
            );
        }
        for round in 0..s.rounds {
            for case in cases.iter_mut().filter(|c| c.phase == phase) {
                let edge = match case.kind {
                    Kind::Memory => &mem_edge,
                    Kind::Disk | Kind::DiskHit => &disk_edge,
                };
                let name = case.name();
                // What to ask: fresh URLs (misses), or URLs stored earlier, each once (hits):
                // the previous round's misses (this round's in the first), or prefilled ones.
                let (prefix, range, expect) = match (case.kind, phase) {
                    (Kind::DiskHit, 0) => {
                        let from = round.saturating_sub(1);
                        let stored = disk_round_sent.get(from as usize).copied().unwrap_or(0);
                        (format!("/disk/{from}/"), 0..stored, XCache::Hit)
                    }
                    (Kind::DiskHit, _) => (
                        "/prefill/".to_string(),
                        next_prefilled..s.prefill,
                        XCache::Hit,
                    ),
                    _ => (format!("/{name}/{round}/"), 0..u64::MAX, XCache::Miss),
                };
                let disk_hits_before = disk_tier_hits(disk_edge.admin);
                let limit = s.warmup + s.measure + Duration::from_secs(30);
                let before = cpu_now();
                let run = client_rt
                    .block_on(async {
                        tokio::time::timeout(
                            limit,
                            unique_gets(
                                edge.addr,
                                &prefix,
                                range.clone(),
                                s.conns,
                                Until::Time {
                                    warmup: s.warmup,
                                    measure: s.measure,
                                },
                                LEN as u64,
                                expect,
                            ),
                        )
                        .await
                    })
                    .unwrap_or_else(|_| panic!("{name}: hung (no progress for 30 s)"))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(run.requests > 0, "{name}: no request completed");
                match case.kind {
                    Kind::Disk => {
                        disk_sent += run.all_requests;
                        if phase == 0 {
                            disk_round_sent.push(run.all_requests);
                        }
                        case.disk_objects = settle(disk_sent, name, Duration::from_secs(60));
                    }
                    Kind::DiskHit => {
                        if phase > 0 {
                            next_prefilled += run.all_requests;
                        }
                        let from_disk =
                            disk_tier_hits(disk_edge.admin).saturating_sub(disk_hits_before);
                        println!(
                            "    {name}: {from_disk} of {} hits answered by the disk tier{}",
                            run.all_requests,
                            if run.all_requests >= range.end - range.start {
                                " (every stored URL was asked: the run ended early)"
                            } else {
                                ""
                            }
                        );
                        case.disk_objects =
                            disk_state(disk_edge.admin).ok().and_then(|d| d.objects);
                    }
                    Kind::Memory => {}
                }
                let after = cpu_now();
                let per_req = |d: Duration| d.as_secs_f64() * 1e6 / run.all_requests as f64;
                let cpu = before.zip(after).map(|(b, a)| {
                    let rt = a.edge_rt.saturating_sub(b.edge_rt);
                    let excluded = a.excluded.saturating_sub(b.excluded);
                    let other = a
                        .process
                        .saturating_sub(b.process)
                        .saturating_sub(rt + excluded);
                    (per_req(rt), per_req(other))
                });
                println!(
                    "  round {}/{} {name:<12} {:>8.0} req/s {:>10} rt CPU/req {:>10} other CPU/req",
                    round + 1,
                    s.rounds,
                    run.rps(),
                    cpu.map_or("-".into(), |c| format!("{:.1} µs", c.0)),
                    cpu.map_or("-".into(), |c| format!("{:.1} µs", c.1)),
                );
                case.rps.push(run.rps());
                if let Some((rt, other)) = cpu {
                    case.rt_us.push(rt);
                    case.other_us.push(other);
                }
                case.latencies.extend_from_slice(run.latency.values());
            }
        }
    }

    report(&cases);
    // Stop the edges (and their disk writers) before the cache directory goes.
    edge_rt.block_on(async {
        mem_edge.stop().await;
        disk_edge.stop().await;
    });
    drop(edge_rt);
    drop(dir);
    if !mismatches.is_empty() {
        eprintln!(
            "disk_miss: the disk admission counters do not add up to the storable misses:\n  {}",
            mismatches.join("\n  ")
        );
        std::process::exit(1);
    }
}

/// `outpost_requests_total{cache="hit",tier="disk"}` of an edge (0 when unreadable).
fn disk_tier_hits(admin: std::net::SocketAddr) -> u64 {
    let Ok(got) = http_get(admin, "/metrics", Duration::from_secs(5)) else {
        return 0;
    };
    String::from_utf8_lossy(&got.body)
        .lines()
        .filter(|l| {
            l.starts_with("outpost_requests_total{")
                && l.contains("cache=\"hit\"")
                && l.contains("tier=\"disk\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn report(cases: &[Case]) {
    println!();
    println!(
        "| {:<12} | {:>12} | {:>8} | {:>8} | {:>8} | {:>11} | {:>13} | {:>9} | {:>15} | {:>13} |",
        "case",
        "disk objects",
        "req/s",
        "p50",
        "p99",
        "rt CPU/req",
        "other CPU/req",
        "CPU/req",
        "req/s vs memory",
        "CPU vs memory"
    );
    println!(
        "|{}|{}:|{}:|{}:|{}:|{}:|{}:|{}:|{}:|{}:|",
        "-".repeat(14),
        "-".repeat(13),
        "-".repeat(9),
        "-".repeat(9),
        "-".repeat(9),
        "-".repeat(12),
        "-".repeat(14),
        "-".repeat(10),
        "-".repeat(16),
        "-".repeat(14),
    );
    let us = |v: &[f64]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1} µs", median(v.to_vec()))
        }
    };
    for case in cases {
        let lat = Latencies::new(case.latencies.clone());
        // Memory and disk ran back to back in each round: compare them per round.
        let memory = cases
            .iter()
            .find(|m| m.kind == Kind::Memory && m.phase == case.phase)
            .filter(|_| case.kind == Kind::Disk);
        let paired = |disk: &[f64], mem: &[f64]| {
            let per_round: Vec<f64> = disk.iter().zip(mem).map(|(d, m)| d / m).collect();
            if per_round.is_empty() {
                String::new()
            } else {
                format!("{:.2}x", median(per_round))
            }
        };
        let (rps_ratio, cpu_ratio) = memory.map_or_else(Default::default, |m| {
            (
                paired(&case.rps, &m.rps),
                paired(&case.cpu_us(), &m.cpu_us()),
            )
        });
        println!(
            "| {:<12} | {:>12} | {:>8.0} | {:>8} | {:>8} | {:>11} | {:>13} | {:>9} | {:>15} | {:>13} |",
            case.name(),
            case.disk_objects.map_or("-".to_string(), |n| n.to_string()),
            median(case.rps.clone()),
            fmt_dur(lat.pct(50.0)),
            fmt_dur(lat.pct(99.0)),
            us(&case.rt_us),
            us(&case.other_us),
            us(&case.cpu_us()),
            rps_ratio,
            cpu_ratio,
        );
    }
}
