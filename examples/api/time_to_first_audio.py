import http.client, json, sys, time
text = " ".join(["The first sentence is short.", "The second one follows it.", "Here comes the third sentence.",
  "The fourth is about the queue.", "The fifth is about the worker.", "The sixth sentence streams too.",
  "The seventh is nearly the end.", "The eighth is still going.", "The ninth is the penultimate one.",
  "The tenth sentence ends it."]) + " " + sys.argv[2]
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
t0 = time.monotonic()
c.request("POST", "/v1/audio/speech", json.dumps({"model": "tts-1", "voice": "en-us", "input": text}), {"content-type": "application/json"})
r = c.getresponse()
got, first = 0, None
while True:
    chunk = r.read1(65536)
    if not chunk: break
    got += len(chunk)
    if first is None and got > 44: first = time.monotonic() - t0
total = time.monotonic() - t0
print(f"first audio byte {first*1000:.0f} ms, whole file {total*1000:.0f} ms, {got} bytes, {(got-44)/2/22050:.1f} s of audio")
