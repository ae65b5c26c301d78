#!/usr/bin/env node
// One-thread encode throughput of the Hugging Face tokenizer (npm `tokenizers`, the Rust
// library) on a JSON-lines corpus, for bench/tokenizer_bench.cc to compare against.
//
//   RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
//     node tokenizer_bench.js NODE_MODULES TOKENIZER CORPUS REPEATS
//
// Timing: one encodeBatch call over the whole corpus per repeat (so the per-call JS overhead is
// paid once, not per document), best of REPEATS. The library's own word cache is warm after
// the first repeat, as ours is. Prints one JSON line: bytes, best seconds, MB/s, and the
// process CPU seconds per wall second during the timed calls (should be ~1: one thread).
'use strict';
const path = require('path');
const { loadHfTokenizer, readCorpus } = require('../tools/golden/hf_tokenizer.js');

async function main() {
  const [nodeModules, tokPath, corpus, repeatsArg] = process.argv.slice(2);
  const tok = loadHfTokenizer(path.resolve(nodeModules, 'tokenizers'), tokPath);
  const texts = readCorpus(corpus).map((d) => d.text);
  const bytes = texts.reduce((n, t) => n + Buffer.byteLength(t, 'utf8'), 0);
  const repeats = parseInt(repeatsArg || '3', 10);
  let best = Infinity, tokens = 0, cpu = 0, wall = 0;
  for (let r = 0; r < repeats; ++r) {
    const c0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    const encs = await tok.encodeBatch(texts, { addSpecialTokens: false });
    const t1 = process.hrtime.bigint();
    const c1 = process.cpuUsage(c0);
    const s = Number(t1 - t0) / 1e9;
    best = Math.min(best, s);
    cpu += (c1.user + c1.system) / 1e6;
    wall += s;
    tokens = encs.reduce((n, e) => n + e.getIds().length, 0);
  }
  console.log(JSON.stringify({ bytes, tokens, seconds: best, mb_per_s: bytes / 1e6 / best,
                               cpu_per_wall: cpu / wall }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
