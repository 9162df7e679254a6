// One page, no build step, no external requests: upload, show, explain.
const $ = (id) => document.getElementById(id);

async function classify(file) {
  $("status").textContent = `Analysing ${file.name}…`;
  $("status").className = "";
  const form = new FormData();
  form.append("file", file);
  try {
    let response = await post(form);
    if (response.status === 401 || response.status === 403) {
      // A server run with --keys: ask once, keep the key for this tab only.
      const key = window.prompt("This server needs an API key (lungxray keys create):");
      if (key) sessionStorage.setItem("lungxray-key", key.trim());
      response = await post(form);
    }
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    show(file, answer);
    $("status").textContent = "";
  } catch (error) {
    $("status").textContent = `Could not analyse ${file.name}: ${error.message}`;
    $("status").className = "error";
    $("result").hidden = true;
  }
}

function post(form) {
  const key = sessionStorage.getItem("lungxray-key");
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  return fetch("/api/predict?explain=true", { method: "POST", body: form, headers });
}

function show(file, answer) {
  // The image as the model saw it (decoded, cropped, resized): browsers cannot show DICOM.
  $("preview").src = answer.image;
  $("heatmap").src = answer.gradcam || "";
  $("toggle").disabled = !answer.gradcam;  // an exported model carries no Grad-CAM
  const ood = Boolean(answer.ood && answer.ood.flag);
  $("ood").hidden = !ood;
  $("ood").textContent = ood ? "This image does not look like the chest X-rays the model was trained on " +
    `(out-of-distribution score ${answer.ood.score.toFixed(1)} above the threshold ${answer.ood.threshold.toFixed(1)}). ` +
    "Its class is withheld: any class the model gave it would not be meaningful." : "";
  $("predicted").textContent = ood || !answer.predicted ? "withheld" : answer.predicted;
  $("answer").classList.toggle("withheld", ood);
  // The conformal set: the classes that cannot be ruled out at the stated coverage.
  const says = { "cannot tell": "cannot tell between the classes", "none fits": "no class fits this image" };
  $("set").hidden = ood || !answer.set_says;
  $("set").textContent = answer.set_says ? `With ${Math.round(100 * answer.coverage)}% coverage: ` +
    (says[answer.set_says] || answer.set_says) : "";
  $("model").textContent = answer.model;
  const bars = $("bars");
  bars.innerHTML = "";
  bars.hidden = ood || !answer.probabilities;
  for (const [name, p] of Object.entries(answer.probabilities || {}).sort((a, b) => b[1] - a[1])) {
    const bar = document.createElement("div");
    bar.className = "bar" + (name === answer.predicted ? " top" : "");
    bar.dataset.class = name;
    bar.innerHTML = `<span>${name}: ${(100 * p).toFixed(1)}%</span><div class="track"><div class="fill"></div></div>`;
    bar.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;  // CSSOM: allowed by the page's CSP
    bars.appendChild(bar);
  }
  $("result").hidden = false;
  toggle();
}

function toggle() {
  const on = $("toggle").checked && !$("toggle").disabled;
  $("heatmap").hidden = !on;
  $("preview").hidden = on;
}

$("file").addEventListener("change", (event) => event.target.files[0] && classify(event.target.files[0]));
$("toggle").addEventListener("change", toggle);
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files[0]) classify(event.dataTransfer.files[0]);
});
