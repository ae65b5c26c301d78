#!/usr/bin/env node
// Golden token ids from the Hugging Face tokenizer (npm `tokenizers`, pinned in
// tools/package.json) for every document of a JSON-lines corpus ({"text": ...} per line).
//
//   node golden_ids.js NODE_MODULES TOKENIZER CORPUS(.jsonl|.jsonl.zst) OUT
//
// OUT: per document, a little-endian uint32 count followed by that many uint32 ids.
'use strict';
const fs = require('fs');
const path = require('path');
const { loadHfTokenizer, readCorpus } = require('./hf_tokenizer.js');

async function main() {
  const [nodeModules, tokPath, corpus, out] = process.argv.slice(2);
  if (!out) {
    console.error('usage: golden_ids.js NODE_MODULES TOKENIZER CORPUS OUT');
    process.exit(2);
  }
  const tok = loadHfTokenizer(path.resolve(nodeModules, 'tokenizers'), tokPath);
  const docs = readCorpus(corpus);
  const chunks = [];
  const batch = 64;
  for (let i = 0; i < docs.length; i += batch) {
    const texts = docs.slice(i, i + batch).map((d) => d.text);
    const encs = await tok.encodeBatch(texts, { addSpecialTokens: false });
    for (const e of encs) {
      const ids = e.getIds();
      const buf = Buffer.alloc(4 * (ids.length + 1));
      buf.writeUInt32LE(ids.length, 0);
      for (let k = 0; k < ids.length; ++k) buf.writeUInt32LE(ids[k], 4 * (k + 1));
      chunks.push(buf);
    }
  }
  fs.writeFileSync(out, Buffer.concat(chunks));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
