// The official OpenAI client against `dsv3 serve` (started by tests/test_serve.c):
//   node serve_client.js NODE_MODULES BASE_URL MODEL PROMPT SYSTEM USER
// Checks the shapes and invariants of the API (streamed deltas concatenate to the plain answer,
// usage counts, logprobs, n, stop strings, errors) and prints one JSON line with the greedy
// answers, which the C test compares with `dsv3 generate`. Exits 1 with a message on a failure.
const OpenAI = require(require('path').resolve(process.argv[2], 'openai'));
const [base, model, prompt, system, user] = process.argv.slice(3);
const client = new OpenAI({ baseURL: base, apiKey: 'test-key', maxRetries: 0, timeout: 30000 });

function check(cond, what) {
    if (!cond) throw new Error('check failed: ' + what);
}
function eq(a, b, what) {
    check(JSON.stringify(a) === JSON.stringify(b), `${what}: ${JSON.stringify(a)} != ${JSON.stringify(b)}`);
}

// The id of a token given by its text (encoding the text alone gives one token), or null.
async function oneTokenId(text) {
    const r = await fetch(base.replace(/\/v1$/, '') + '/tokenize', {
        method: 'POST', headers: { Authorization: 'Bearer test-key' }, body: JSON.stringify({ content: text, add_special: false }) });
    const t = (await r.json()).tokens;
    return t.length === 1 ? t[0] : null;
}

async function idOf(text) {
    const id = await oneTokenId(text);
    check(id !== null, `the text ${JSON.stringify(text)} is one token`);
    return id;
}

async function countTokens(text) {
    const r = await fetch(base.replace(/\/v1$/, '') + '/tokenize', {
        method: 'POST', headers: { Authorization: 'Bearer test-key' }, body: JSON.stringify({ content: text }) });
    return (await r.json()).count;
}

// Streams a request; returns {texts, finish, usage, roles, chunks, logprobs} per choice index.
async function collect(stream, chat) {
    const out = { texts: {}, finish: {}, roles: {}, usage: null, logprobs: {}, order: [] };
    for await (const chunk of stream) {
        if (chunk.usage) {
            eq(chunk.choices, [], 'the usage chunk has no choices');
            out.usage = chunk.usage;
            continue;
        }
        for (const c of chunk.choices) {
            const i = c.index;
            check(!(i in out.finish), `choice ${i}: a chunk after its finish_reason`);
            out.texts[i] = out.texts[i] || '';
            if (chat) {
                if (c.delta.role) {
                    check(out.texts[i] === '' && !out.roles[i], `choice ${i}: the role comes first, once`);
                    out.roles[i] = c.delta.role;
                } else {
                    check(out.roles[i] === 'assistant', `choice ${i}: content before the role`);
                }
                out.texts[i] += c.delta.content || '';
                if (c.logprobs && c.logprobs.content) (out.logprobs[i] = out.logprobs[i] || []).push(...c.logprobs.content);
            } else {
                out.texts[i] += c.text;
            }
            if (c.finish_reason) out.finish[i] = c.finish_reason;
        }
    }
    return out;
}

async function main() {
    const result = {};
    const nPrompt = await countTokens(prompt);

    // completions: plain, then streamed
    const plain = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0 });
    const t = plain.choices[0].text;
    eq(plain.object, 'text_completion', 'object');
    eq(plain.model, model, 'model');
    check(plain.id.startsWith('cmpl-'), 'id');
    eq(plain.usage.prompt_tokens, nPrompt, 'usage.prompt_tokens');
    eq(plain.usage.total_tokens, plain.usage.prompt_tokens + plain.usage.completion_tokens, 'usage.total_tokens');
    check(['stop', 'length'].includes(plain.choices[0].finish_reason), 'finish_reason');
    if (plain.choices[0].finish_reason === 'length') eq(plain.usage.completion_tokens, 24, 'completion_tokens at length');
    result.completion = t;
    const s = await collect(await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0, stream: true,
                                                              stream_options: { include_usage: true } }), false);
    eq(s.texts[0], t, 'streamed completion deltas concatenate to the plain answer');
    eq(s.finish[0], plain.choices[0].finish_reason, 'streamed finish_reason');
    eq(s.usage, plain.usage, 'streamed usage');

    // chat: plain, streamed
    const messages = [{ role: 'system', content: system }, { role: 'user', content: user }];
    const chat = await client.chat.completions.create({ model, messages, max_completion_tokens: 20, temperature: 0 });
    eq(chat.object, 'chat.completion', 'object');
    eq(chat.choices[0].message.role, 'assistant', 'role');
    result.chat = chat.choices[0].message.content;
    const cs = await collect(await client.chat.completions.create({ model, messages, max_tokens: 20, temperature: 0,
                                                                    stream: true }), true);
    eq(cs.texts[0], result.chat, 'streamed chat deltas concatenate to the plain answer');
    eq(cs.finish[0], chat.choices[0].finish_reason, 'streamed chat finish_reason');
    eq(cs.usage, null, 'no usage chunk unless asked');
    // content as an array of text parts renders like the string
    const parts = await client.chat.completions.create({ model, max_tokens: 20, temperature: 0, messages: [
        { role: 'system', content: [{ type: 'text', text: system }] }, { role: 'user', content: [{ type: 'text', text: user }] }] });
    eq(parts.choices[0].message.content, result.chat, 'content as text parts');

    // logprobs: chat (entries with top alternatives, most likely first; greedy picks the first)
    const lp = await client.chat.completions.create({ model, messages, max_tokens: 8, temperature: 0, logprobs: true,
                                                      top_logprobs: 3 });
    const content = lp.choices[0].logprobs.content;
    eq(content.length, lp.usage.completion_tokens, 'one logprobs entry per token');
    for (const e of content) {
        eq(e.top_logprobs.length, 3, 'top_logprobs length');
        check(e.logprob <= 0 && Array.isArray(e.bytes), 'entry shape');
        check(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob && e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob,
              'alternatives most likely first');
        check(Math.abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6, 'greedy takes the most likely token');
    }
    const lps = await collect(await client.chat.completions.create({ model, messages, max_tokens: 8, temperature: 0,
                                                                     logprobs: true, top_logprobs: 3, stream: true }), true);
    eq(lps.logprobs[0], content, 'streamed logprobs equal the plain ones');
    // logprobs: completions (parallel arrays)
    const clp = await client.completions.create({ model, prompt, max_tokens: 6, temperature: 0, logprobs: 2 });
    const L = clp.choices[0].logprobs;
    eq(L.tokens.length, clp.usage.completion_tokens, 'completion logprobs tokens');
    eq(L.token_logprobs.length, L.tokens.length, 'token_logprobs');
    eq(L.top_logprobs.length, L.tokens.length, 'top_logprobs');
    check(L.top_logprobs.every((o) => Object.keys(o).length >= 1 && Object.keys(o).length <= 2), 'top_logprobs entries');

    // echo: the answer starts with the prompt, streamed or not
    const ec = await client.completions.create({ model, prompt, max_tokens: 6, temperature: 0, echo: true });
    const six = (await client.completions.create({ model, prompt, max_tokens: 6, temperature: 0 })).choices[0].text;
    eq(ec.choices[0].text, prompt + six, 'echo: the prompt, then the answer');
    const ecs = await collect(await client.completions.create({ model, prompt, max_tokens: 6, temperature: 0, echo: true,
                                                                stream: true }), false);
    eq(ecs.texts[0], ec.choices[0].text, 'echo, streamed');
    // echo with max_tokens 0 and logprobs: the prompt's own log-probabilities, the first null (how
    // lm-evaluation-harness scores continuations through this API)
    const sc = await client.completions.create({ model, prompt, max_tokens: 0, echo: true, logprobs: 2 });
    eq(sc.choices[0].text, prompt, 'echo with max_tokens 0: the prompt alone');
    eq(sc.usage.completion_tokens, 0, 'echo with max_tokens 0: no tokens');
    eq(sc.choices[0].finish_reason, 'length', 'echo with max_tokens 0: finish_reason');
    const P = sc.choices[0].logprobs;
    eq(P.tokens.length, nPrompt, 'a logprobs entry per prompt token');
    eq(P.token_logprobs[0], null, "the prompt's first token has no log-probability");
    eq(P.top_logprobs[0], null, "nor alternatives");
    check(P.token_logprobs.slice(1).every((x) => typeof x === 'number' && x <= 0), 'prompt log-probabilities');
    check(P.top_logprobs.slice(1).every((o) => Object.keys(o).length >= 1 && Object.keys(o).length <= 2), 'prompt alternatives');
    const scg = await client.completions.create({ model, prompt, max_tokens: 3, temperature: 0, echo: true, logprobs: 1 });
    eq(scg.choices[0].logprobs.token_logprobs.slice(0, nPrompt), P.token_logprobs, 'prompt log-probabilities, then the answer\'s');
    eq(scg.choices[0].logprobs.tokens.length, nPrompt + scg.usage.completion_tokens, 'echo: entries for prompt and answer');
    result.prompt_logprobs = P.token_logprobs;
    result.prompt_ids = await (await fetch(base.replace(/\/v1$/, '') + '/tokenize', {
        method: 'POST', headers: { Authorization: 'Bearer test-key' }, body: JSON.stringify({ content: prompt }) })).json()
        .then((r) => r.tokens);

    // several prompts in one request: n answers each, in order, each what it gets alone
    const other = 'a second prompt';
    const both = await client.completions.create({ model, prompt: [prompt, other], max_tokens: 6, temperature: 0, n: 2 });
    const alone2 = (await client.completions.create({ model, prompt: other, max_tokens: 6, temperature: 0 })).choices[0].text;
    eq(both.choices.map((c) => c.index), [0, 1, 2, 3], 'several prompts: choice indices');
    eq(both.choices.map((c) => c.text), [six, six, alone2, alone2], 'several prompts: each answer as alone');
    eq(both.usage.prompt_tokens, nPrompt + await countTokens(other), 'several prompts: usage counts each prompt once');
    const bs = await collect(await client.completions.create({ model, prompt: [prompt, other], max_tokens: 6, temperature: 0,
                                                               stream: true }), false);
    eq([bs.texts[0], bs.texts[1]], [six, alone2], 'several prompts, streamed');

    // logit_bias: +100 makes every token that id, -100 bans the greedy answer's first token (of a
    // prompt whose greedy first token is whole text: a piece of a character has no text to name it by)
    let first = null, firstId = null;
    for (const p of [prompt, 'the cache', 'a request', 'every token', 'weights']) {
        first = await client.completions.create({ model, prompt: p, max_tokens: 1, temperature: 0, logprobs: 0 });
        firstId = await oneTokenId(first.choices[0].logprobs.tokens[0]);
        if (firstId !== null) {
            first.prompt = p;
            break;
        }
    }
    check(firstId !== null, 'a prompt whose greedy first token is whole text');
    const forced = result.prompt_ids[result.prompt_ids.length - 1];
    const fb = await client.completions.create({ model, prompt, max_tokens: 4, temperature: 0, logprobs: 0,
                                                 logit_bias: { [forced]: 100 } });
    const tokText = P.tokens[P.tokens.length - 1];
    eq(fb.choices[0].logprobs.tokens, [tokText, tokText, tokText, tokText], 'logit_bias +100 forces the id');
    const bb = await client.completions.create({ model, prompt: first.prompt, max_tokens: 1, temperature: 0, logprobs: 0,
                                                 logit_bias: { [String(firstId)]: -100 } });
    check(bb.choices[0].logprobs.tokens[0] !== first.choices[0].logprobs.tokens[0], 'logit_bias -100 bans the id');

    // JSON mode: every answer that ends by itself is a JSON object; the rest stopped at max_tokens.
    // (A random model wanders: a bias towards the structural characters lets objects close.)
    const jbias = {};
    for (const ch of ['"', '}', ':', ',', '1']) jbias[await idOf(ch)] = 6;
    const jreq = { model, messages, max_tokens: 300, temperature: 1, seed: 5, n: 8, logit_bias: jbias,
                   response_format: { type: 'json_object' } };
    const jr = await client.chat.completions.create(jreq);
    let closed = 0;
    for (const c of jr.choices) {
        if (c.finish_reason === 'stop') {
            const o = JSON.parse(c.message.content);
            check(o !== null && typeof o === 'object' && !Array.isArray(o), 'a JSON-mode answer is an object: ' + c.message.content);
            closed++;
        } else {
            eq(c.finish_reason, 'length', 'a JSON-mode answer ends as an object or at max_tokens');
        }
    }
    check(closed >= 2, `JSON mode: ${closed} of 8 answers closed their object`);
    const js = await collect(await client.chat.completions.create({ ...jreq, stream: true }), true);
    eq(jr.choices.map((c) => js.texts[c.index]), jr.choices.map((c) => c.message.content), 'JSON mode, streamed');
    result.json_answers = jr.choices.filter((c) => c.finish_reason === 'stop').map((c) => c.message.content);

    // structured outputs: every answer that ends by itself fits the schema (checked field by field
    // here, and again by the C test from result.schema_answers); the rest stopped at max_tokens
    const schema = { type: 'object', additionalProperties: false, required: ['name', 'count', 'kind'],
                     properties: { name: { type: 'string' }, count: { type: 'integer' }, kind: { enum: ['a', 'b'] },
                                   tags: { type: 'array', items: { type: 'boolean' }, maxItems: 2 } } };
    const fits = (o) => o !== null && typeof o === 'object' && !Array.isArray(o) &&
        Object.keys(o).every((k) => ['name', 'count', 'kind', 'tags'].includes(k)) &&
        typeof o.name === 'string' && Number.isInteger(o.count) && ['a', 'b'].includes(o.kind) &&
        (o.tags === undefined || (Array.isArray(o.tags) && o.tags.length <= 2 && o.tags.every((t) => typeof t === 'boolean')));
    const sreq = { model, messages, max_tokens: 300, temperature: 1, seed: 7, n: 8, logit_bias: jbias,
                   response_format: { type: 'json_schema', json_schema: { name: 'item', schema, strict: true } } };
    const sr = await client.chat.completions.create(sreq);
    let fitted = 0;
    for (const c of sr.choices) {
        if (c.finish_reason === 'stop') {
            check(fits(JSON.parse(c.message.content)), 'a structured answer fits its schema: ' + c.message.content);
            fitted++;
        } else {
            eq(c.finish_reason, 'length', 'a structured answer ends complete or at max_tokens');
        }
    }
    check(fitted >= 2, `json_schema: ${fitted} of 8 answers completed their object`);
    result.schema_answers = sr.choices.filter((c) => c.finish_reason === 'stop').map((c) => c.message.content);

    // tools: a named tool_choice (and "required") forces one call of the function, its arguments a
    // JSON object; finish_reason "tool_calls", content null; streamed as one tool_calls delta
    const tools = [{ type: 'function', function: { name: 'get_weather', description: 'The weather in a city', strict: true,
                                                    parameters: { type: 'object', properties: { city: { type: 'string' } },
                                                                  required: ['city'], additionalProperties: false } } },
                   { type: 'function', function: { name: 'get_time' } }];
    const treq = { model, messages, max_tokens: 300, temperature: 1, seed: 9, n: 6, logit_bias: jbias, tools,
                   tool_choice: { type: 'function', function: { name: 'get_time' } } };
    const tr = await client.chat.completions.create(treq);
    let called = 0;
    for (const c of tr.choices) {
        if (c.finish_reason !== 'tool_calls') {
            eq(c.finish_reason, 'length', 'a forced call ends as a call or at max_tokens');
            continue;
        }
        called++;
        eq(c.message.content, null, 'a forced call: no content');
        eq(c.message.tool_calls.length, 1, 'a forced call: one call');
        const call = c.message.tool_calls[0];
        eq([call.type, call.function.name], ['function', 'get_time'], 'the named function is called');
        check(typeof call.id === 'string' && call.id.length > 0, 'a call has an id');
        const args = JSON.parse(call.function.arguments);
        check(args !== null && typeof args === 'object' && !Array.isArray(args), 'arguments are a JSON object: ' + call.function.arguments);
    }
    check(called >= 2, `named tool_choice: ${called} of 6 answers completed their call`);
    // a forced call's arguments are held to the function's parameters
    const wr = await client.chat.completions.create({ ...treq, tool_choice: { type: 'function', function: { name: 'get_weather' } } });
    let held = 0;
    for (const c of wr.choices.filter((c) => c.finish_reason === 'tool_calls')) {
        const args = JSON.parse(c.message.tool_calls[0].function.arguments);
        eq(Object.keys(args), ['city'], 'get_weather is called with exactly its parameters');
        check(typeof args.city === 'string', 'city is a string');
        held++;
    }
    check(held >= 2, `get_weather: ${held} of 6 answers completed their call`);
    const tsr = { model, messages, max_tokens: 300, temperature: 1, seed: 9, logit_bias: jbias, tools, tool_choice: 'required' };
    const tq = await client.chat.completions.create(tsr);
    const ts = await client.chat.completions.create({ ...tsr, stream: true });
    const tcs = {};
    let sfinish = null;
    for await (const chunk of ts) {
        for (const ch of chunk.choices) {
            for (const d of ch.delta.tool_calls || []) {
                if (!tcs[d.index]) tcs[d.index] = { id: d.id, name: '', arguments: '' };
                if (d.function && d.function.name) tcs[d.index].name += d.function.name;
                if (d.function && d.function.arguments) tcs[d.index].arguments += d.function.arguments;
            }
            if (ch.finish_reason) sfinish = ch.finish_reason;
        }
    }
    eq(sfinish, tq.choices[0].finish_reason, 'required, streamed: the same finish');
    if (tq.choices[0].finish_reason === 'tool_calls') {
        check(['get_weather', 'get_time'].includes(tq.choices[0].message.tool_calls[0].function.name), 'required: one of the tools');
        eq(Object.values(tcs).map((c) => [c.name, c.arguments]),
           tq.choices[0].message.tool_calls.map((c) => [c.function.name, c.function.arguments]), 'required, streamed: the same call');
    }
    // tool_choice auto (the default with tools): the model opens its calls itself — here a +100 bias
    // on the calls' opening token makes it the first — and from there each call is held to the
    // format and to its function's parameters; several calls may follow one another (a +2 bias on
    // the calls' close, allowed only between calls, keeps most answers to a few)
    const abias = { ...jbias, [await idOf('<｜tool▁calls▁begin｜>')]: 100, [await idOf('<｜tool▁calls▁end｜>')]: 2 };
    const ar = await client.chat.completions.create({ model, messages, max_tokens: 600, temperature: 1, seed: 11, n: 6,
                                                     logit_bias: abias, tools });
    let opened = 0, calls = 0;
    for (const c of ar.choices) {
        if (c.finish_reason !== 'tool_calls') {
            eq(c.finish_reason, 'length', 'auto: opened calls end complete or at max_tokens');
            continue;
        }
        opened++;
        check(c.message.tool_calls.length >= 1, 'auto: at least one call');
        for (const call of c.message.tool_calls) {
            calls++;
            check(['get_weather', 'get_time'].includes(call.function.name), 'auto: a call of one of the tools');
            const args = JSON.parse(call.function.arguments);
            check(typeof args === 'object' && args !== null && !Array.isArray(args), 'auto: the arguments are an object');
            if (call.function.name === 'get_weather') eq(Object.keys(args), ['city'], 'auto: get_weather gets exactly its parameters');
        }
    }
    check(opened >= 2, `tool_choice auto: ${opened} of 6 answers completed their calls`);
    // parallel_tool_calls false: the calls close after one
    const a1 = await client.chat.completions.create({ model, messages, max_tokens: 600, temperature: 1, seed: 12, n: 6,
                                                     logit_bias: abias, tools, parallel_tool_calls: false });
    let single = 0;
    for (const c of a1.choices.filter((c) => c.finish_reason === 'tool_calls')) {
        eq(c.message.tool_calls.length, 1, 'parallel_tool_calls false: one call');
        JSON.parse(c.message.tool_calls[0].function.arguments);
        single++;
    }
    check(single >= 2, `parallel_tool_calls false: ${single} of 6 answers completed their call`);
    result.auto_calls = { opened, calls, single };
    // a conversation with calls and their outputs is rendered and answered; bad tools are 400s
    const called0 = tr.choices.find((c) => c.finish_reason === 'tool_calls');
    const follow = await client.chat.completions.create({ model, max_tokens: 4, temperature: 0, tools, messages: [
        ...messages, { role: 'assistant', content: null, tool_calls: called0.message.tool_calls },
        { role: 'tool', tool_call_id: called0.message.tool_calls[0].id, content: '09:00' }] });
    check(['stop', 'length', 'tool_calls'].includes(follow.choices[0].finish_reason), 'an answer after tool outputs');
    for (const bad of [{ tools: [{ type: 'function', function: { name: 'bad name' } }] }, { tools: {} },
                       { tools, tool_choice: { type: 'function', function: { name: 'nope' } } }, { tool_choice: 'required' }]) {
        let status = 0;
        try { await client.chat.completions.create({ model, messages, max_tokens: 2, ...bad }); } catch (e) { status = e.status; }
        eq(status, 400, 'bad tools: ' + JSON.stringify(bad));
    }

    // best_of: of best_of answers drawn (choice k with seed + k, as n draws them), the n with the
    // highest mean log-probability per token, best first; usage counts every answer drawn
    const drawn = await client.completions.create({ model, prompt, max_tokens: 8, temperature: 1, seed: 77, n: 4, logprobs: 0 });
    const mean = (c) => c.logprobs.token_logprobs.reduce((a, b) => a + b, 0) / c.logprobs.token_logprobs.length;
    const ranked = drawn.choices.map((c) => ({ text: c.text, m: mean(c) })).sort((a, b) => b.m - a.m);
    const best = await client.completions.create({ model, prompt, max_tokens: 8, temperature: 1, seed: 77, n: 2, best_of: 4 });
    eq(best.choices.map((c) => c.index), [0, 1], 'best_of: n choices');
    eq(best.choices.map((c) => c.text), ranked.slice(0, 2).map((r) => r.text), 'best_of: the two most likely per token');
    eq(best.usage.completion_tokens, drawn.usage.completion_tokens, 'best_of: usage counts every answer drawn');

    // n > 1: sampled with a seed, repeatable, one finish per choice
    const req = { model, prompt, max_tokens: 12, temperature: 1.0, seed: 1234, n: 3 };
    const a = await client.completions.create(req), b = await client.completions.create(req);
    eq(a.choices.map((c) => c.index), [0, 1, 2], 'n choices');
    eq(a.choices.map((c) => c.text), b.choices.map((c) => c.text), 'a seeded request repeats');
    check(new Set(a.choices.map((c) => c.text)).size > 1, 'the choices of n draw differently: ' + JSON.stringify(a.choices.map((c) => c.text)));
    eq(a.usage.prompt_tokens, nPrompt, 'n: the prompt counted once');
    const ns = await collect(await client.completions.create({ ...req, stream: true }), false);
    eq([0, 1, 2].map((i) => ns.texts[i]), a.choices.map((c) => c.text), 'n streamed');
    eq(Object.keys(ns.finish).length, 3, 'n streamed: a finish_reason per choice');

    // stop strings: the answer ends before the first occurrence, finish_reason "stop" (on an answer
    // that EOS does not cut short)
    const long = (await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0, ignore_eos: true })).choices[0].text;
    const k = Math.floor(long.length / 2), stop = long.slice(k, k + 2);
    if (stop.length === 2) {
        const want = long.slice(0, long.indexOf(stop));
        const st = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0, ignore_eos: true,
                                                     stop: [stop, '@@never@@'] });
        eq(st.choices[0].text, want, `stop ${JSON.stringify(stop)}`);
        eq(st.choices[0].finish_reason, 'stop', 'finish_reason at a stop string');
        const sst = await collect(await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0, stop,
                                                                     ignore_eos: true, stream: true }), false);
        eq(sst.texts[0], want, 'stop, streamed');
        eq(sst.finish[0], 'stop', 'stop, streamed finish_reason');
        result.stop_checked = stop;
    }

    // errors come back as the client's typed errors
    try {
        await client.completions.create({ model: 'no-such-model', prompt, max_tokens: 2 });
        check(false, 'an unknown model is refused');
    } catch (e) {
        eq(e.status, 404, 'unknown model status');
        eq(e.error && e.error.param, 'model', 'unknown model param');
    }
    try {
        await client.chat.completions.create({ model, messages, max_tokens: 2, top_logprobs: 21, logprobs: true });
        check(false, 'top_logprobs 21 is refused');
    } catch (e) {
        eq(e.status, 400, 'top_logprobs status');
    }
    const models = await client.models.list();
    eq(models.data.map((m) => m.id), [model], 'models');
    console.log(JSON.stringify(result));
}

main().catch((e) => {
    console.error(e && e.message ? e.message : String(e), e && e.stack ? e.stack.split("\n").slice(1, 3).join(" ") : "");
    process.exit(1);
});
