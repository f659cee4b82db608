// Vercel's AI SDK (npm `ai` + `@ai-sdk/openai-compatible`), an OpenAI-compatible client written
// independently of OpenAI's SDKs, against itemstream: generateText, streamText, an error, and a
// stream the client aborts. Prints one JSON object with what it saw.
//   node ai_sdk.mjs <base url ending in /v1>
import { generateText, streamText } from "ai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";

const baseURL = process.argv[2];
const provider = createOpenAICompatible({ name: "itemstream", baseURL, apiKey: "unused" });
const model = provider.chatModel("itemstream-mock");
const out = {};

const done = await generateText({ model, prompt: "three words please", maxTokens: 5 });
out.text = done.text;
out.finishReason = done.finishReason;
out.usage = done.usage;

const streamed = streamText({ model, prompt: "three words please" });
let pieces = "";
for await (const piece of streamed.textStream) pieces += piece;
out.streamedText = pieces;
out.streamedFinish = await streamed.finishReason;

try {
  await generateText({ model, prompt: "x".repeat(40_000), maxRetries: 0 });
  out.error = null;
} catch (error) {
  out.error = { status: error.statusCode ?? null, message: String(error.message ?? error) };
}

const controller = new AbortController();
const aborted = streamText({ model, prompt: "a long answer", abortSignal: controller.signal });
let received = 0;
try {
  for await (const piece of aborted.textStream) {
    received += 1;
    if (received === 3) controller.abort();
  }
  out.abort = { received, ended: "normally" };
} catch (error) {
  out.abort = { received, ended: error.name };
}
console.log(JSON.stringify(out));
