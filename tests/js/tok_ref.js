// The JavaScript reference for dsv3's tokenizer tests and benchmark: @lenml/tokenizers (the
// transformers.js tokenizer code), installed at test time by tests/js/setup.sh, never committed.
//
//   node tests/js/tok_ref.js MODULES encode TOKENIZER_JSON [--lines] [--stats] < text > ids
//   node tests/js/tok_ref.js MODULES decode TOKENIZER_JSON [--lines] < ids > text
//   node tests/js/tok_ref.js MODULES chat TOKENIZER_JSON < [{"messages": [...], "add_generation_prompt": true}, ...]
//   node tests/js/tok_ref.js MODULES specials TOKENIZER_JSON     (every added token, one per line)
//
// MODULES is the node_modules directory holding @lenml/tokenizers. Output formats are those of
// `dsv3 tokenize` / `dsv3 detokenize` so the two can be compared byte for byte. tokenizer_config.json
// is read from beside TOKENIZER_JSON when it exists.
"use strict";
const fs = require("fs");
const path = require("path");

const [modules, mode, tokPath, ...rest] = process.argv.slice(2);
if (!modules || !mode || !tokPath) {
  process.stderr.write("usage: tok_ref.js MODULES encode|decode|chat|specials TOKENIZER_JSON [--lines] [--stats]\n");
  process.exit(2);
}
const lines = rest.includes("--lines");
const stats = rest.includes("--stats");

const tokJSON = JSON.parse(fs.readFileSync(tokPath, "utf8"));
if (mode === "specials") {
  for (const t of tokJSON.added_tokens) process.stdout.write(t.content + "\n");
  process.exit(0);
}
const cfgPath = path.join(path.dirname(tokPath), "tokenizer_config.json");
const tokConfig = fs.existsSync(cfgPath) ? JSON.parse(fs.readFileSync(cfgPath, "utf8")) : {};
const { TokenizerLoader } = require(path.resolve(modules, "@lenml/tokenizers"));
const t0 = process.hrtime.bigint();
const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON: tokJSON, tokenizerConfig: tokConfig });
const t1 = process.hrtime.bigint();

// stdin as bytes; lines are cut on the byte 0x0A before decoding, as dsv3 does
const input = fs.readFileSync(0);
function splitLines(buf) {
  const out = [];
  let start = 0;
  for (;;) {
    const nl = buf.indexOf(10, start);
    if (nl < 0) break;
    out.push(buf.subarray(start, nl));
    start = nl + 1;
  }
  if (start < buf.length) out.push(buf.subarray(start));
  return out;
}
const write = (s) => fs.writeSync(1, s);

if (mode === "encode") {
  const chunks = lines ? splitLines(input) : [input];
  const texts = chunks.map((b) => b.toString("utf8"));
  const e0 = process.hrtime.bigint();
  const out = texts.map((s) => tok.encode(s, { add_special_tokens: false }));
  const e1 = process.hrtime.bigint();
  let ntok = 0;
  const parts = [];
  for (const ids of out) {
    ntok += ids.length;
    parts.push(ids.join(" ") + "\n");
  }
  write(parts.join(""));
  if (stats) {
    const enc = Number(e1 - e0) / 1e9;
    process.stderr.write(`load ${(Number(t1 - t0) / 1e9).toFixed(3)} s; encoded ${input.length} bytes into ${ntok} ` +
      `tokens in ${enc.toFixed(3)} s (${(input.length / 1e6 / enc).toFixed(2)} MB/s)\n`);
  }
} else if (mode === "decode") {
  const text = input.toString("utf8");
  const groups = lines ? text.split("\n").slice(0, text.endsWith("\n") ? -1 : undefined) : [text];
  const parts = [];
  for (const g of groups) {
    const ids = g.split(/\s+/).filter((x) => x.length).map(Number);
    parts.push((ids.length ? tok.decode(ids, { skip_special_tokens: false }) : "") + (lines ? "\n" : ""));
  }
  write(Buffer.from(parts.join(""), "utf8"));
} else if (mode === "chat") {
  // one line of ids per conversation
  const reqs = JSON.parse(input.toString("utf8"));
  const parts = [];
  for (const req of reqs) {
    const ids = tok.apply_chat_template(req.messages, {
      add_generation_prompt: !!req.add_generation_prompt,
      tokenize: true,
      return_tensor: false,
    });
    parts.push(Array.from(ids).join(" ") + "\n");
  }
  write(parts.join(""));
} else {
  process.stderr.write(`tok_ref.js: unknown mode '${mode}'\n`);
  process.exit(2);
}
