// What the API's job and adapter objects mean on the page: which statuses are still moving,
// each method's display name and label, and the two numbers several views show.

export const ACTIVE = new Set(["validating_files", "queued", "running", "cancel_requested"]);
export const CANCELLABLE = new Set(["validating_files", "queued", "running"]);

// Display names only: what each method is, its settings, defaults and ranges come from the
// server (GET /v1/methods, derived from core's configs). The order fixes chart colours.
export const METHOD_NAMES = {
  lora: "LoRA",
  adapter: "Bottleneck adapter",
  prompt_tuning: "Prompt tuning",
  feature_extraction: "Feature extraction",
  full: "Full fine-tuning",
};

// OpenAI's method types: a job created with one trains LoRA, whose parameters it echoes under
// "lora" beside OpenAI's block.
const OPENAI_TYPES = new Set(["supervised", "dpo"]);

// The loraplex method a job or adapter trains: its type, and where its parameters are.
export function trainedMethod(method) {
  return OPENAI_TYPES.has(method.type) ? "lora" : method.type;
}

export function methodLabel(method) {
  if (!method) return "—";
  const type = typeof method === "string" ? method : trainedMethod(method);
  const params = (typeof method === "object" && method[type]) || {};
  let extra = "";
  if (type === "lora" && params.r) extra = ` r=${params.r}`;
  if (type === "adapter" && params.bottleneck_size) extra = ` ${params.bottleneck_size}`;
  if (type === "prompt_tuning" && params.n_virtual_tokens) extra = ` ${params.n_virtual_tokens} tok`;
  const openai = typeof method === "object" && type !== method.type ? ` (OpenAI ${method.type})` : "";
  return `${METHOD_NAMES[type] || type}${extra}${openai}`;
}

export function valAccuracy(job, adapter) {
  const m = job?.metrics || {};
  const a = adapter?.metrics || {};
  return m.val_accuracy ?? a.val_accuracy ?? null;
}

export function trainSeconds(job) {
  return job.started_at && job.finished_at ? job.finished_at - job.started_at : null;
}
