// The answer, as both field pages show it: the server page (app.js) and the in-browser page
// (webapp_static/field.js, which ships a copy of this file). One markup, one colour code, one bar
// per class; the pages' index.html hold only an empty <div class="answer" id="answer">.

// Cancer-like classes red, lesion-but-benign amber, normal/negative green; others by position.
export function tone(label, index) {
  const name = String(label).toLowerCase();
  if (/^(non|no|not)[-_ ]|negative|normal|healthy/.test(name)) return "tone-green";
  if (/malignan|cancer|carcinoma|idc|tumou?r|positive/.test(name)) return "tone-red";
  if (/benign/.test(name)) return "tone-amber";
  return "tone-" + (index % 6);
}

function percent(p) {
  return (100 * p).toFixed(1) + " %";
}

// The answer block both field pages show, built whole here so that neither page holds a copy of
// its markup: caption, predicted label and its probability, the uncertain note, one bar per
// label, the decision rule and a line about the model. `answer`: the page's empty
// <div class="answer">. `uncertain`: inside the model's uncertain band the int8 answer may differ
// from the float model's, so the answer is shown in a neutral colour, never as a confident red or
// green, with a note. `threshold` ({positive, value} or null) is marked on its class's bar: with
// a threshold, the highest bar is not always the answer. `rule` and `meta`: each page's own words.
export function renderAnswer(answer, result, labels, { threshold = null, uncertain = false, rule = "", meta = "" } = {}) {
  // One element of the block; the ids are how the pages' tests and automation find its parts.
  const part = (tag, id, className, text = "") => {
    const element = document.createElement(tag);
    if (id) element.id = id;
    element.className = className;
    element.textContent = text;
    return element;
  };
  const tint = uncertain ? "tone-uncertain" : tone(result.label, labels.indexOf(result.label));
  const prediction = part("p", "prediction", "label " + tint, result.label);
  prediction.dataset.label = result.label;
  prediction.dataset.uncertain = String(uncertain);
  const note = part("p", "uncertain", "uncertain", "Uncertain — review on a second reader");
  note.setAttribute("role", "status");
  note.hidden = !uncertain;

  const bars = part("ul", "bars", "bars");
  labels.forEach((label, index) => {
    const p = result.probabilities[label];
    const item = document.createElement("li");
    item.dataset.label = label;
    item.dataset.probability = String(p);
    if (label === result.label) item.classList.add("chosen");

    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label;
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(p);
    const track = document.createElement("div");
    track.className = "track";
    track.setAttribute("role", "img");
    track.setAttribute("aria-label", label + " " + (100 * p).toFixed(1) + " percent");
    const fill = document.createElement("div");
    fill.className = "fill " + tone(label, index);
    // CSSOM assignment, not a style attribute: allowed by the CSP's style-src 'self'.
    fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(1) + "%";
    track.append(fill);
    if (threshold && threshold.positive === label) {
      const mark = document.createElement("div");
      mark.className = "threshold";
      mark.title = "threshold " + (100 * threshold.value).toFixed(1) + " %";
      mark.style.left = Math.max(0, Math.min(100, 100 * threshold.value)).toFixed(1) + "%";
      track.append(mark);
    }
    item.append(name, value, track);
    bars.append(item);
  });
  answer.replaceChildren(part("p", "", "caption", "Predicted class"), prediction,
                         part("p", "probability", "probability", "p = " + percent(result.probability)), note, bars,
                         part("p", "rule", "rule", rule), part("p", "meta", "meta", meta));
}
