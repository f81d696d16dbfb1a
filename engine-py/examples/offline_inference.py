# The same script runs on vLLM: only the import line differs (README "Python").
import sys

from llmd import LLM, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM2-135M-Instruct"
llm = LLM(model=model, max_model_len=2048)
params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32, seed=0)
for out in llm.generate(["Hello, my name is", "The capital of France is"], params):
    print(repr(out.prompt), "->", repr(out.outputs[0].text))
reply = llm.chat([{"role": "user", "content": "Say hi!"}], params)
print(reply[0].outputs[0].text)
