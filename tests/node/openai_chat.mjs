// One chat completion with the official `openai` npm package, sent through the gateway the way docs/CLIENTS.md
// tells Node 20 users to: argv[2] is "dispatcher" (the SDK's fetchOptions with an undici ProxyAgent) or
// "global" (undici's EnvHttpProxyAgent as the global dispatcher, which reads HTTPS_PROXY / NO_PROXY), or "env"
// (nothing in code: what an agent configured by environment variables alone does).
// The gateway's CA comes from NODE_EXTRA_CA_CERTS. Prints the answer as one JSON line.
import OpenAI from "openai";
import { EnvHttpProxyAgent, ProxyAgent, setGlobalDispatcher } from "undici";

const [how, invocation] = process.argv.slice(2);
const options = { apiKey: "sk-node-not-a-real-key", maxRetries: 0, defaultHeaders: { "clrk-invocation-id": invocation } };
if (how === "dispatcher") {
  options.fetchOptions = { dispatcher: new ProxyAgent(process.env.HTTPS_PROXY) };
} else if (how === "global") {
  setGlobalDispatcher(new EnvHttpProxyAgent());
} else if (how !== "env") {
  throw new Error(`unknown way ${how}`);
}
const client = new OpenAI(options);
try {
  const out = await client.chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }] });
  console.log(JSON.stringify({ ok: true, content: out.choices[0].message.content, model: out.model }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e), cause: String(e.cause ?? "") }));
  process.exitCode = 1;
}
